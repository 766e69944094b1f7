"""Output defenses: shape and simplex invariants, row independence, top-1 behaviour, hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest

from service.defenses import DEFENSES, dcp, label_only, make_defense, reverse_sigmoid, round_probs, topk

SETTINGS = dict(k=2, decimals=2, beta=0.3, gamma=0.5, tau=0.9, nu=100.0)


def _row(head: list[float], classes: int) -> np.ndarray:
    """`head` followed by the rest of the mass spread evenly over the remaining classes."""
    row = np.zeros(classes)
    row[: len(head)] = head
    row[len(head):] = (1.0 - sum(head)) / (classes - len(head))
    return row


def _mixed_batch_10() -> np.ndarray:
    rng = np.random.default_rng(0)
    rows = [
        _row([0.99], 10),  # very confident
        _row([0.15, 0.14, 0.13], 10),  # low confidence: top 0.15, the rest ~0.083
        _row([0.49, 0.48], 10),  # two-way near tie
        _row([0.11], 10),  # uniform-ish: 0.11 then 0.0989 x 9
        np.array([0.7, 0.0, 0.2, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0]),  # exact zeros
        np.eye(10)[3],  # one-hot: nine exact zeros
        *rng.dirichlet(np.full(10, 0.5), size=6),  # random, seeded
        *rng.dirichlet(np.full(10, 5.0), size=4),  # random, flatter
    ]
    batch = np.stack(rows)
    batch /= batch.sum(1, keepdims=True)
    return batch.astype(np.float32)


def _low_confidence_batch_100() -> np.ndarray:
    rng = np.random.default_rng(1)
    rows = [
        _row([0.05], 100),  # top 0.05, the rest ~0.0096
        _row([0.03, 0.02], 100),
        *rng.dirichlet(np.full(100, 1.0), size=6),  # tops of a few percent
    ]
    batch = np.stack(rows)
    batch /= batch.sum(1, keepdims=True)
    return batch.astype(np.float32)


MIXED = _mixed_batch_10()
LOW_100 = _low_confidence_batch_100()
BATCHES = {"mixed_10": MIXED, "low_confidence_100": LOW_100}


def _other_models(name: str, probs: np.ndarray) -> dict:
    """What a defense that reads other models gets in these tests: each row's probabilities reversed (mass moved off
    the top classes), a stand-in misinformation model."""
    return {m: probs[:, ::-1].copy() for m in DEFENSES.entry(name).get("models", ())}


def _defend(name: str, probs: np.ndarray) -> np.ndarray:
    fn, _ = make_defense(name, **SETTINGS)
    return fn(probs.copy(), **_other_models(name, probs))


def test_the_test_batches_are_float32_probability_rows():
    for batch in BATCHES.values():
        assert batch.dtype == np.float32
        assert np.all(batch >= 0)
        np.testing.assert_allclose(batch.astype(np.float64).sum(1), 1.0, atol=1e-6)
    assert MIXED.max(1).min() < 0.2 and MIXED.max(1).max() > 0.98  # really mixed
    assert (MIXED == 0).any()
    assert LOW_100.max(1).max() < 0.15


@pytest.mark.parametrize("batch_name", BATCHES)
@pytest.mark.parametrize("name", DEFENSES)
def test_every_defense_returns_probability_rows_of_the_input_shape_and_dtype(name, batch_name):
    probs = BATCHES[batch_name]
    out = _defend(name, probs)
    assert out.shape == probs.shape
    assert out.dtype == probs.dtype
    assert np.all(np.isfinite(out))
    assert np.all(out >= 0) and np.all(out <= 1)
    np.testing.assert_allclose(out.astype(np.float64).sum(1), 1.0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch_name", BATCHES)
@pytest.mark.parametrize("name", DEFENSES)
def test_every_defense_treats_each_row_on_its_own(name, batch_name):
    # ART's ClassLabels once marked every row of a batch from one row's answer: the batch result must equal
    # the rows defended one at a time, so a confident answer never changes an unsure one beside it.
    probs = BATCHES[batch_name]
    batch_out = _defend(name, probs)
    row_by_row = np.concatenate([_defend(name, probs[i:i + 1]) for i in range(len(probs))])
    np.testing.assert_allclose(batch_out, row_by_row, rtol=0, atol=1e-7)
    reversed_out = _defend(name, probs[::-1])[::-1]  # neighbours and position do not matter either
    np.testing.assert_allclose(batch_out, reversed_out, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", DEFENSES)
def test_no_defense_modifies_its_input_array(name):
    probs = MIXED.copy()
    _defend(name, probs)
    np.testing.assert_array_equal(probs, MIXED)


@pytest.mark.parametrize("name", [n for n in DEFENSES if DEFENSES.entry(n).get("keeps_top1") and n != "round"])
def test_defenses_that_declare_keeps_top1_keep_every_rows_top1(name):
    for probs in BATCHES.values():
        np.testing.assert_array_equal(_defend(name, probs).argmax(1), probs.argmax(1))


@pytest.mark.parametrize("decimals", [0, 1, 2, 3])
def test_round_keeps_the_top1_unless_rounding_ties_it_at_the_top(decimals):
    for probs in BATCHES.values():
        out = round_probs(probs, decimals)
        rows = np.arange(len(probs))
        top = probs.argmax(1)
        kept = out.argmax(1) == top
        tied_at_top = out[rows, top] == out.max(1)  # the original top-1 is still (one of) the largest
        assert np.all(kept | tied_at_top)
    # with enough places nothing ties, and the top-1 is kept on every row of the mixed batch
    np.testing.assert_array_equal(round_probs(MIXED, 6).argmax(1), MIXED.argmax(1))
    # at 2 places some Dirichlet rows do tie at the top (0.2048 vs 0.1975 -> 0.20 and 0.20): the only way it moves
    out = round_probs(MIXED, 2)
    rows = np.arange(len(MIXED))
    assert np.any(out.argmax(1) != MIXED.argmax(1))
    moved = out.argmax(1) != MIXED.argmax(1)
    np.testing.assert_array_equal(out[rows, MIXED.argmax(1)][moved], out.max(1)[moved])


def test_the_declared_keeps_top1_flags_are_the_documented_ones():
    assert {n for n in DEFENSES if DEFENSES.entry(n).get("keeps_top1")} == {"none", "topk", "round", "label_only"}
    assert {n for n in DEFENSES if not DEFENSES.entry(n).get("keeps_top1")} == {"reverse_sigmoid", "dcp",
                                                                                 "misinformation"}


@pytest.mark.parametrize("name", ["reverse_sigmoid", "dcp"])
def test_perturbing_defenses_keep_the_top1_of_rows_whose_top1_is_at_least_0_15(name):
    # With beta=0.3, gamma=0.5: q(p) = p - 0.3 (sqrt(p) / (sqrt(p) + sqrt(1-p)) - 1/2) is increasing for
    # p > ~0.0225 and never exceeds q(0) = 0.15 below that, while q(0.15) ~ 0.21; so a top-1 >= 0.15 stays on top.
    sure_enough = MIXED.max(1) >= 0.15
    assert sure_enough.sum() >= 10
    out = _defend(name, MIXED)
    np.testing.assert_array_equal(out[sure_enough].argmax(1), MIXED[sure_enough].argmax(1))


def test_reverse_sigmoid_can_change_the_top1_of_a_low_confidence_row_with_many_classes():
    # q(p) = p - beta (sigmoid(gamma logit p) - 1/2) is not monotone near 0: a class at ~0 gets q ~ beta/2 = 0.15,
    # a class at 0.05 gets 0.05 + 0.3 (0.5 - 0.1866) ~ 0.144. A 100-class row with top 0.05, nineteen runners-up
    # at 0.0499 and eighty classes at ~2.4e-5 therefore has its top-1 handed to one of the near-zero classes.
    # This is why the service's `label` comes from the model's undefended answer, not from the defended one.
    row = np.empty(100)
    row[0], row[1:20] = 0.05, 0.0499
    row[20:] = (1.0 - row[:20].sum()) / 80
    probs = row[None].astype(np.float32)
    assert probs.argmax(1)[0] == 0
    out = reverse_sigmoid(probs, beta=0.3, gamma=0.5)
    assert out.argmax(1)[0] >= 20  # a class the model gave ~2.4e-5
    assert out[0, 20] > out[0, 0]
    # dcp (tau = 0.9) gates this row in, so it changes it the same way
    np.testing.assert_array_equal(dcp(probs, beta=0.3, gamma=0.5, tau=0.9), out)
    assert not DEFENSES.entry("reverse_sigmoid").get("keeps_top1") and not DEFENSES.entry("dcp").get("keeps_top1")


def test_topk_keeps_the_k_largest_and_renormalises():
    # [0.5, 0.3, 0.2] with k=2: keep 0.5 and 0.3 (sum 0.8) -> 0.5/0.8 = 0.625, 0.3/0.8 = 0.375, 0.
    out = topk(np.array([[0.5, 0.3, 0.2]]), k=2)
    np.testing.assert_allclose(out, [[0.625, 0.375, 0.0]], rtol=0, atol=1e-12)
    # k=1 is one-hot; k >= classes keeps the row as it is
    np.testing.assert_allclose(topk(np.array([[0.2, 0.5, 0.3]]), k=1), [[0.0, 1.0, 0.0]])
    np.testing.assert_allclose(topk(np.array([[0.2, 0.5, 0.3]]), k=5), [[0.2, 0.5, 0.3]])


def test_round_uses_largest_remainder_so_rows_still_sum_to_one():
    # decimals=1, [0.46, 0.34, 0.2]: scaled [4.6, 3.4, 2.0], floors [4, 3, 2] sum 9, so 1 unit is still to hand out;
    # remainders [0.6, 0.4, 0.0] -> the unit goes to the first -> [5, 3, 2] / 10 = [0.5, 0.3, 0.2].
    out = round_probs(np.array([[0.46, 0.34, 0.2]], dtype=np.float32), decimals=1)
    np.testing.assert_allclose(out, [[0.5, 0.3, 0.2]], rtol=0, atol=1e-7)
    # decimals=1, [0.33, 0.33, 0.34]: plain rounding gives [0.3, 0.3, 0.3] (sum 0.9). Floors [3, 3, 3] leave 1 unit;
    # remainders [0.3, 0.3, 0.4] -> it goes to the third -> [0.3, 0.3, 0.4].
    out = round_probs(np.array([[0.33, 0.33, 0.34]]), decimals=1)
    np.testing.assert_allclose(out, [[0.3, 0.3, 0.4]], rtol=0, atol=1e-12)
    # decimals=0 is one-hot on the largest remainder (here the top-1)
    np.testing.assert_array_equal(round_probs(np.array([[0.2, 0.7, 0.1]]), decimals=0), [[0.0, 1.0, 0.0]])


def test_label_only_answers_a_one_hot_of_the_top1():
    probs = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.0, 0.0, 1.0]], dtype=np.float32)
    out = label_only(probs)
    np.testing.assert_array_equal(out, np.eye(3, dtype=np.float32)[[1, 0, 2]])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(label_only(MIXED), np.eye(10, dtype=np.float32)[MIXED.argmax(1)])


def test_reverse_sigmoid_matches_the_docstring_formula_computed_by_hand():
    # q = p - beta * (sigmoid(gamma * logit(p)) - 1/2), then clip to [0, 1] and renormalise.
    # gamma = 0.5: sigmoid(0.5 * logit p) = 1 / (1 + sqrt((1-p)/p)) = sqrt(p) / (sqrt(p) + sqrt(1-p)).
    # p = 0.8: sqrt(0.8) = 2 sqrt(0.2), so sigmoid = 2/3; r = 0.3 * (2/3 - 1/2) = 0.05; q = 0.8 - 0.05 = 0.75.
    # p = 0.2: sigmoid = 1/3; r = 0.3 * (1/3 - 1/2) = -0.05; q = 0.2 + 0.05 = 0.25. Sum 1: renormalising changes nothing.
    out = reverse_sigmoid(np.array([[0.8, 0.2]], dtype=np.float32), beta=0.3, gamma=0.5)
    np.testing.assert_allclose(out, [[0.75, 0.25]], rtol=0, atol=1e-6)
    assert out.dtype == np.float32
    # gamma = 1: sigmoid(logit p) = p, so r = beta (p - 1/2). [0.5, 0.25, 0.25], beta = 0.4:
    # r = [0, -0.1, -0.1] -> q = [0.5, 0.35, 0.35], sum 1.2 -> [0.5, 0.35, 0.35] / 1.2 = [5/12, 7/24, 7/24].
    out = reverse_sigmoid(np.array([[0.5, 0.25, 0.25]]), beta=0.4, gamma=1.0)
    np.testing.assert_allclose(out, [[5 / 12, 7 / 24, 7 / 24]], rtol=0, atol=1e-12)
    # beta = 3, gamma = 1 on [0.9, 0.1]: r = [1.2, -1.2] -> q = [-0.3, 1.3] -> clipped to [0, 1].
    out = reverse_sigmoid(np.array([[0.9, 0.1]]), beta=3.0, gamma=1.0)
    np.testing.assert_allclose(out, [[0.0, 1.0]], rtol=0, atol=1e-12)


def test_dcp_returns_confident_rows_unchanged_and_reverse_sigmoids_the_others():
    tau, beta, gamma = 0.9, 0.3, 0.5
    out = dcp(MIXED, beta=beta, gamma=gamma, tau=tau)
    confident = MIXED.max(1) >= tau
    assert 0 < confident.sum() < len(MIXED)
    np.testing.assert_array_equal(out[confident], MIXED[confident])
    np.testing.assert_array_equal(out[~confident], reverse_sigmoid(MIXED[~confident], beta, gamma))
    assert np.all(np.abs(out[~confident] - MIXED[~confident]).max(1) > 1e-3)  # really perturbed
    # the gate is "top-1 below tau": a row whose top-1 equals tau is left alone
    at_tau = np.array([[0.9, 0.1], [0.89, 0.11]])
    gated = dcp(at_tau, beta=beta, gamma=gamma, tau=0.9)
    np.testing.assert_array_equal(gated[0], at_tau[0])
    np.testing.assert_array_equal(gated[1], reverse_sigmoid(at_tau[1:], beta, gamma)[0])
    # tau = 0 perturbs nothing; tau = 1 perturbs every row that is not exactly one-hot
    np.testing.assert_array_equal(dcp(MIXED, beta, gamma, tau=0.0), MIXED)
    np.testing.assert_array_equal(dcp(LOW_100, beta, gamma, tau=1.0), reverse_sigmoid(LOW_100, beta, gamma))


def test_make_defense_rejects_an_unknown_name_listing_the_known_ones():
    with pytest.raises(ValueError) as e:
        make_defense("gaussian_noise", **SETTINGS)
    message = str(e.value)
    assert "gaussian_noise" in message
    for name in DEFENSES:
        assert name in message


def test_make_defense_binds_only_the_declared_params():
    for d in DEFENSES.entries():
        fn, params = make_defense(d.name, **SETTINGS, unrelated="ignored")
        assert params == {p: SETTINGS[p] for p in d.params}
    fn, params = make_defense("topk", **SETTINGS)
    assert params == {"k": 2}
    np.testing.assert_allclose(fn(np.array([[0.5, 0.3, 0.2]])), [[0.625, 0.375, 0.0]])
    fn, params = make_defense("none")
    assert params == {}
    np.testing.assert_array_equal(fn(MIXED), MIXED)
    fn, params = make_defense("dcp", **SETTINGS)
    assert params == {"beta": 0.3, "gamma": 0.5, "tau": 0.9}
    np.testing.assert_array_equal(fn(MIXED), dcp(MIXED, 0.3, 0.5, 0.9))


def test_misinformation_blends_unsure_answers_toward_the_misinformation_model():
    from service.defenses import misinformation
    probs = np.array([[0.95, 0.05], [0.5, 0.5]], np.float32)
    g = np.array([[0.1, 0.9], [0.2, 0.8]], np.float32)
    out = misinformation(probs, nu=100.0, tau=0.9, misinformation=g)
    a = 1 / (1 + np.exp(-100 * (0.9 - 0.95)))  # sigmoid(-5): a confident answer stays nearly the model's
    np.testing.assert_allclose(out[0], (1 - a) * probs[0] + a * g[0], rtol=1e-6)
    np.testing.assert_allclose(out[1], g[1], atol=1e-6)  # sigmoid(40): an unsure one is the misinformation model's
    assert DEFENSES.entry("misinformation").get("models") == ("misinformation",)
