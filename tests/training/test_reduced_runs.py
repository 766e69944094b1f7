"""The options a reduced-cost scale uses (evaluation's `cpu-full`), through real tiny runs on digits: test scoring
only after the last epoch, robust accuracy on a subset, a teacher fine-tuned from the base, PGD under bf16."""
from __future__ import annotations

import json

import pytest
import torch

from training.config import make_config, validate
from training.loop import RunError
from training.pgd import PGDConfig, adversarial_set
from training.train_ast import run, stage_settings


def _log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_test_every_scores_the_test_set_only_when_due_and_always_after_the_last_epoch(tmp_path):
    run(make_config("digits", teacher="base", epochs=5, test_every=2), tmp_path / "r", device="cpu", progress=False,
        export=False)
    rows = _log(tmp_path / "r" / "base" / "log.jsonl")
    assert [r["test_accuracy"] is not None for r in rows] == [False, True, False, True, True]
    run(make_config("digits", teacher="base", epochs=3, test_every=0), tmp_path / "last", device="cpu",
        progress=False, export=False)
    rows = _log(tmp_path / "last" / "base" / "log.jsonl")
    assert [r["test_accuracy"] is not None for r in rows] == [False, False, True]
    assert 0.5 < rows[-1]["test_accuracy"] <= 1


def test_robust_accuracy_on_a_subset_is_recorded_with_its_size(tmp_path):
    summary = run(make_config("digits", teacher="base", epochs=2, robust_images=50), tmp_path / "r", device="cpu",
                  progress=False)
    card = json.loads((tmp_path / "r" / "base" / "model.json").read_text())
    assert card["robustness"]["images"] == 50 and 0 <= summary["robust_accuracy"] <= 1


def test_init_from_base_starts_the_teacher_from_the_base_weights(tmp_path, monkeypatch):
    import training.train_ast as train_ast
    started = {}
    real_fit = train_ast.fit

    def fit(model, recipe, *args, **kwargs):  # the weights the teacher's first step starts from
        started[recipe.name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return real_fit(model, recipe, *args, **kwargs)

    monkeypatch.setattr(train_ast, "fit", fit)
    one = dict(teacher="stt", epochs=1, base_epochs=3)
    tuned_cfg = make_config("digits", **one, init_from_base=True)
    stage = stage_settings(tuned_cfg, "stt", 1, 2)
    assert stage["init_from_base"] is True and stage["base_epochs"] == 3
    assert "init_from_base" not in stage_settings(make_config("digits", **one), "stt", 1, 2)  # old keys kept
    tuned = run(tuned_cfg, tmp_path / "t1", device="cpu", progress=False, export=False)
    base_weights = torch.load(tmp_path / "t1" / "base" / "checkpoint.pt", weights_only=False)["model"]
    assert started["stt"].keys() == base_weights.keys()
    assert all(torch.equal(started["stt"][k], base_weights[k]) for k in base_weights)
    scratch = run(make_config("digits", **one), tmp_path / "s1", device="cpu", progress=False, export=False,
                  base_dir=tmp_path / "t1" / "base")  # the same base, reused
    assert not all(torch.equal(started["stt"][k], base_weights[k]) for k in base_weights)  # a fresh start
    # One epoch from the base keeps most of its accuracy; one from scratch is far behind.
    assert tuned["test_accuracy"] > scratch["test_accuracy"] + 0.1, (tuned["test_accuracy"], scratch["test_accuracy"])


def test_a_finished_run_measures_robustness_again_on_another_number_of_images(tmp_path):
    run(make_config("digits", teacher="base", epochs=2, robust_images=50), tmp_path / "r", device="cpu",
        progress=False)
    again = run(make_config("digits", teacher="base", epochs=2, robust_images=80), tmp_path / "r", device="cpu",
                progress=False)  # the same weights, reused
    card = json.loads((tmp_path / "r" / "base" / "model.json").read_text())
    assert card["robustness"]["images"] == 80 and again["robust_accuracy"] == card["robustness"]["accuracy"]


def test_bad_reduced_options_name_the_option():
    for field, value, message in (("test_every", -1, "--test-every"), ("robust_images", 0, "--robust-images")):
        with pytest.raises(ValueError, match=message):
            validate(make_config("digits", **{field: value}))


def test_pgd_under_bf16_stays_in_the_ball_and_is_cached_apart(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)).eval()
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 10, (40,))
    cfg = PGDConfig(eps=0.1, step=0.05, steps=3)
    fp32 = adversarial_set(model, images, labels, cfg, cache_dir=tmp_path, progress=False)
    bf16 = adversarial_set(model, images, labels, cfg, cache_dir=tmp_path, progress=False, precision="bf16")
    assert len(list(tmp_path.glob("adv-*.pt"))) == 2  # two sets, two cache files
    for adv in (fp32, bf16):
        assert (adv.float() - images.float() / 255).abs().max() <= 0.1 + 1e-3
    assert (fp32 != bf16).any()  # the bf16 gradients are not the fp32 ones
    with pytest.raises(ValueError, match="precision"):
        adversarial_set(model, images, labels, cfg, cache_dir=None, progress=False, precision="fp16")


def test_a_fine_tuning_at_its_own_rate_reuses_the_base_trained_at_the_base_rate(tmp_path):
    base = run(make_config("digits", teacher="base", epochs=2, lr=0.05), tmp_path / "b", device="cpu",
               progress=False, export=False)
    checkpoint = tmp_path / "b" / "base" / "checkpoint.pt"
    before = checkpoint.read_bytes()
    cfg = make_config("digits", teacher="stt", epochs=1, base_epochs=2, lr=0.01, base_lr=0.05, init_from_base=True)
    tuned = run(cfg, tmp_path / "t", device="cpu", progress=False, export=False, base_dir=tmp_path / "b" / "base")
    assert checkpoint.read_bytes() == before  # the base was read back, not trained again at lr 0.01
    assert tuned["base"]["test_accuracy"] == base["test_accuracy"]
    stage = json.loads((tmp_path / "t" / "metrics.json").read_text())["settings"]
    assert stage["lr"] == 0.01 and stage["base_lr"] == 0.05
    assert "base_lr" not in stage_settings(make_config("digits", teacher="stt"), "stt", 1, 2)  # old keys kept
    with pytest.raises(ValueError, match="--base-lr must be positive"):
        validate(make_config("digits", base_lr=0.0))
    # Without base_lr, the base's settings would be the fine-tuning's rate: another base, which the shared one is not.
    with pytest.raises(RunError, match="differs in: lr"):
        run(make_config("digits", teacher="stt", epochs=1, base_epochs=2, lr=0.01, init_from_base=True),
            tmp_path / "t2", device="cpu", progress=False, export=False, base_dir=tmp_path / "b" / "base")
