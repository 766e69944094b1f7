"""The attack suite (clients/attack/attacks.py and its modules): each treatment's maths by hand, the choices an
attack makes from what the thief has and nothing else, and the whole suite through the real service."""
from __future__ import annotations

import asyncio
import json
import math

import numpy as np
import pytest
import torch

from clients.attack.answers import TransferSet
from clients.attack.attacks import ATTACKS, Setting, attack_names, run_attack, smoothed_answers, worst_case
from clients.attack.recovery import fit_recovery, recover, thief_recipe
from clients.attack.skeptical import SkepticalStudent, skeptical_loss
from clients.attack.student import StudentSpec, new_student
from clients.attack.victim import OnnxVictim, answers
from clients.steal import main
from conftest import serve
from service.defenses import round_probs, topk
from training.data import Split, load_dataset
from training.distill import recovered_logits

CPU = torch.device("cpu")


# ---------------------------------------------------------------- logit recovery

def test_logit_recovery_is_exact_for_full_precision_answers_up_to_the_constant():
    z = torch.randn(64, 10, dtype=torch.float64) * 3
    got = recovered_logits(torch.softmax(z, 1), floor=1e-300)
    torch.testing.assert_close(got, z - z.mean(1, keepdim=True), rtol=0, atol=1e-10)


def test_logit_recovery_under_topk_keeps_the_kept_differences_and_flattens_the_rest():
    z = torch.tensor([[3.0, 1.0, 0.5, -1.0, -2.0]], dtype=torch.float64)
    p = torch.from_numpy(topk(torch.softmax(z, 1).numpy(), 2))
    got = recovered_logits(p)
    assert got[0, 0] - got[0, 1] == pytest.approx(2.0, abs=1e-9)  # the two kept logits: their gap, exactly
    assert torch.all(got[0, 2:] == got[0, 2])  # the others: one value (log 1e-12, centred), their order lost
    assert got[0, 1] - got[0, 2] == pytest.approx(math.log(p[0, 1].item()) - math.log(1e-12), abs=1e-9)


def test_logit_recovery_under_rounding_is_off_by_at_most_the_rounding_step():
    z = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    p = torch.softmax(z, 1)  # 0.665, 0.245, 0.090
    q = torch.from_numpy(round_probs(p.numpy(), 2))
    got, true = recovered_logits(q)[0], (z - z.mean())[0]
    # Rounding to 0.01 moves each log-probability by at most log((p + 0.005) / p), so each centred logit by at most
    # twice the largest of those.
    bound = 2 * max(math.log((v + 0.005) / v) for v in p[0].tolist())
    assert torch.all((got - true).abs() <= bound) and not torch.allclose(got, true, atol=1e-6)


# ---------------------------------------------------------------- attacks on a victim in-process

@pytest.fixture(scope="module")
def victim(digits_run) -> OnnxVictim:
    return OnnxVictim(digits_run[0] / "model.onnx")


@pytest.fixture(scope="module")
def shared(victim) -> tuple[TransferSet, Split, np.ndarray]:
    data = load_dataset("digits")
    images, labels = data.train.images[:240], data.train.labels[:240]
    transfer = TransferSet(images, labels, answers(victim, images), {})
    return transfer, data.test, answers(victim, data.test.images)


class Counting:
    """The victim's `ask`, counting every image it is asked about."""

    def __init__(self, victim):
        self.victim, self.asked = victim, 0

    def __call__(self, images, probs):
        self.asked += int(np.isnan(probs).any(1).sum())
        return asyncio.run(self.victim.answer(images, probs))


def setting(victim, shared, tmp_path, *, epochs: int = 3, transfer=None, test=None, ask=None) -> Setting:
    t, test_split, test_answers = shared
    return Setting(victim.card, victim.defense, ask or Counting(victim), transfer or t, test or test_split,
                   test_answers, StudentSpec("digits_cnn", epochs=epochs), tmp_path, CPU)


def test_the_hard_attack_sees_nothing_but_the_argmax(victim, shared, tmp_path):
    transfer = shared[0]
    # The same top-1, other probabilities: the sharpened answers (the top-1 gets 0.9, the rest share 0.1).
    sharp = np.full_like(transfer.probs, 0.1 / 9)
    sharp[np.arange(len(sharp)), transfer.probs.argmax(1)] = 0.9
    other = TransferSet(transfer.images, transfer.labels, sharp, {})
    a = ATTACKS["hard"].run(setting(victim, shared, tmp_path / "a"))
    b = ATTACKS["hard"].run(setting(victim, shared, tmp_path / "b", transfer=other))
    for (name, x), (_, y) in zip(a.student.state_dict().items(), b.student.state_dict().items()):
        assert torch.equal(x, y), name


def test_the_temperature_is_chosen_on_the_held_out_answers_never_on_the_test_set(victim, shared, tmp_path):
    test = shared[1]
    scrambled = Split(test.images, test.labels.roll(1))  # a test set with every label wrong
    a = run_attack("temperature-sweep", setting(victim, shared, tmp_path / "a"), temperatures=(1, 8))
    b = run_attack("temperature-sweep", setting(victim, shared, tmp_path / "b", test=scrambled), temperatures=(1, 8))
    assert a["chosen"]["temperature"] == b["chosen"]["temperature"]
    assert a["chosen"]["agreement_by_temperature"] == b["chosen"]["agreement_by_temperature"]
    assert a["chosen"]["held_out"] == 24 and a["queries_used"] == 0  # a tenth of the 240 bought answers
    by_t = a["chosen"]["agreement_by_temperature"]
    assert by_t[str(int(a["chosen"]["temperature"]))] == max(by_t.values())


def test_smoothing_averages_exactly_n_answers_per_image_and_pays_for_each(victim, shared, tmp_path):
    ask = Counting(victim)
    s = setting(victim, shared, tmp_path, ask=ask)
    x, mean, _, bought = smoothed_answers(s, 3)
    assert len(x) == 80 and bought == ask.asked == 240  # budget 240: 80 images, 3 views each
    saved = TransferSet.load(tmp_path / "transfer.npz")
    np.testing.assert_allclose(mean.numpy(), saved.probs.reshape(3, 80, -1).mean(0), rtol=0, atol=1e-7)
    views = saved.images.reshape(3, 80, *x.shape[1:])
    assert not torch.equal(views[0], views[1])  # three different crops of each image
    again = smoothed_answers(s, 3)  # a rerun asks for nothing: the answers were paid for
    assert again[3] == 0 and ask.asked == 240


def test_noise_and_jbda_buy_their_own_queries_within_the_budget(victim, shared, tmp_path):
    noise = run_attack("noise", setting(victim, shared, tmp_path / "noise"))
    assert noise["queries_used"] == 240
    jbda = run_attack("jbda", setting(victim, shared, tmp_path / "jbda"), rounds=2)
    assert jbda["chosen"]["seed_size"] == 60 and jbda["chosen"]["final_size"] == 240
    assert jbda["queries_used"] == 180 <= 240


def test_the_recovery_mlp_maps_defended_answers_back_better_than_leaving_them():
    torch.manual_seed(0)
    w = torch.randn(16, 10)  # two tiny known models: a base and its Stingy (top-2) answers
    train, held = torch.randn(2000, 16), torch.randn(500, 16)
    base = lambda x: torch.softmax(x @ w, 1)  # noqa: E731
    defended = lambda x: torch.from_numpy(topk(base(x).numpy(), 2))  # noqa: E731
    mlp = fit_recovery(defended(train), base(train), epochs=60)
    target = torch.log(base(held))

    def kl(p):  # KL(base || p)
        return float((base(held) * (target - torch.log(p.clamp_min(1e-12)))).sum(1).mean())
    assert kl(recover(mlp, defended(held))) < 0.5 * kl(defended(held))


def test_the_thief_reproduces_the_recipe_the_card_names(victim, shared, tmp_path):
    s = setting(victim, shared, tmp_path)
    recipe, hyper = thief_recipe(s)
    assert recipe == "ast" and hyper["alpha"] == 0.05 and hyper["top_k"] == 2  # the digits AST's card
    base_card = s.card.__class__.from_dict({**s.card.to_dict(), "teacher": {"type": "base"}})
    s.card, s.defense = base_card, {"name": "topk", "params": {"k": 2}}
    assert thief_recipe(s)[0] == "base"  # a base behind an output defense: the defense is all there is
    s.defense = {"name": "none", "params": {}}
    assert thief_recipe(s)[0] == "base"  # the card names the base: its pair is the base twice
    s.card = s.card.__class__.from_dict({k: v for k, v in s.card.to_dict().items() if k != "teacher"})
    assert thief_recipe(s)[0] == "ast"  # nothing named and no output defense: AST
    s.defense = {"name": "round", "params": {"decimals": 2}}
    assert thief_recipe(s)[0] == "base"  # nothing named behind an output defense: the defense is all there is


def test_the_skeptical_student_has_two_auxiliary_heads_and_its_loss_by_hand(shared):
    images = shared[0].images[:8]
    student = SkepticalStudent(new_student(StudentSpec("digits_cnn"), images, 10, CPU), 10, images[:2].float() / 255)
    final = student(images.float() / 255)
    early, late = student.heads
    assert final.shape == early.shape == late.shape == (8, 10)
    # Heads equal to the victim and to the final head: only the cross-entropy terms are left.
    z = torch.tensor([[2.0, 0.0]])
    y = torch.tensor([0])
    ce = -math.log(math.exp(2) / (math.exp(2) + 1))
    loss, _ = skeptical_loss(z, z, z, torch.softmax(z / 4, 1), y, temperature=4.0, alpha=0.9)
    assert loss.item() == pytest.approx(0.1 * ce + 0.7 * ce + ce, rel=1e-5)


def test_the_worst_case_is_the_most_accurate_student_with_agreement_breaking_ties():
    results = {"a": {"student_accuracy": 0.8, "agreement": 0.7}, "b": {"student_accuracy": 0.9, "agreement": 0.8},
               "c": {"student_accuracy": 0.9, "agreement": 0.85}, "d": {"student_accuracy": None}}
    assert worst_case(results) == {"attack": "c", "student_accuracy": 0.9, "agreement": 0.85}
    assert worst_case({}) is None


def test_all_names_every_attack_but_the_legacy_logit_and_a_bad_name_is_refused():
    assert "logit" not in attack_names("all") and len(attack_names("all")) == len(ATTACKS) - 1
    assert attack_names("hard, soft,hard") == ["hard", "soft"]
    assert attack_names("none", allow_none=True) == []
    with pytest.raises(ValueError, match="unknown attack 'none'"):
        attack_names("none")
    with pytest.raises(ValueError, match="unknown attack 'blur'; known: soft"):
        attack_names("soft,blur")


# ---------------------------------------------------------------- the whole suite through the real service

def test_steal_with_every_attack_reports_each_one_and_the_worst_case(digits_run, tmp_path):
    with serve(digits_run[0] / "model.onnx", "--budget-db", str(tmp_path / "b.sqlite")) as server:
        before = server.metric("astguard_images_served_total", key="anonymous")
        out = tmp_path / "steal"
        assert main(["--url", server.url, "--attack", "all", "--queries", "digits:train", "--budget", "160",
                     "--eval", "digits:test", "--student", "digits_cnn", "--epochs", "2", "--no-reference",
                     "--no-progress", "--out", str(out)]) == 0
        served = server.metric("astguard_images_served_total", key="anonymous") - before
    r = json.loads((out / "report.json").read_text())
    assert list(r["attacks"]) == attack_names("all")
    for name, a in r["attacks"].items():
        assert 0 <= a["student_accuracy"] <= 1 and 0 <= a["agreement"] <= 1 and a["seconds"] >= 0, name
    own = {k: v["queries_used"] for k, v in r["attacks"].items() if v["queries_used"]}
    assert set(own) == {"smoothing", "noise", "jbda"} and all(v <= 160 for v in own.values())
    assert served == 160 + 360 + sum(own.values()) == r["queries_used"] + 360  # shared + evaluation + their own
    worst = r["worst_case"]
    assert r["attacks"][worst["attack"]]["student_accuracy"] == max(a["student_accuracy"]
                                                                      for a in r["attacks"].values())
    assert r["student_accuracy"] == worst["student_accuracy"]  # the headline is the worst case
    md = (out / "report.md").read_text()
    assert f"| {worst['attack']} (worst case) |" in md and md.count("\n| ") >= len(r["attacks"]) + 2


def test_own_answers_are_kept_for_reuse_and_thrown_away_with_overwrite(digits_run, tmp_path):
    with serve(digits_run[0] / "model.onnx", "--budget-db", str(tmp_path / "b.sqlite")) as server:
        def served():
            return server.metric("astguard_images_served_total", key="anonymous")

        out = tmp_path / "steal"
        args = ["--url", server.url, "--attack", "noise,smoothing", "--budget", "60", "--student", "digits_cnn",
                "--epochs", "1", "--no-progress", "--out", str(out)]
        assert main(args) == 0
        assert served() == 60 + 60 + 60  # shared, noise's own, smoothing's own
        assert main([*args, "--reuse"]) == 0 and served() == 180  # trained again, nothing bought
        assert json.loads((out / "report.json").read_text())["queries_used"] == 0
        (out / "attacks" / "noise" / "transfer.npz").unlink()
        assert main([*args, "--reuse"]) == 2  # noise has nothing saved to reuse: one line, no traceback
        assert main([*args, "--overwrite"]) == 0 and served() == 360  # a new plan: every answer bought again
