"""The answer statistics of the evaluation (Table 3) against values worked out by hand."""
import math

import pytest
import torch

from evaluation.stats import answer_statistics, class_entropy, describe, entropy, entropy_histogram, over_seeds, \
    within_class_kl

PROBS = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]])
LABELS = torch.tensor([0, 0, 1])


def test_entropy_in_nats_with_zero_log_zero():
    assert entropy(PROBS).tolist() == pytest.approx([math.log(2), 0.0, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))])


def test_class_entropy_is_the_mean_per_true_class():
    assert class_entropy(PROBS, LABELS).tolist() == pytest.approx([math.log(2) / 2, 0.5623351446188083])


def test_within_class_kl_against_the_class_mean_answer():
    # class 0: mean answer (0.75, 0.25); KL((.5,.5) || mean) = .5 ln(.5/.75) + .5 ln(.5/.25); KL((1,0) || mean) = ln(4/3)
    first = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    expected0 = (first + math.log(1 / 0.75)) / 2
    assert within_class_kl(PROBS, LABELS).tolist() == pytest.approx([expected0, 0.0])
    assert expected0 == pytest.approx(0.2157615543388357)


def test_identical_answers_have_no_within_class_kl_and_classes_without_images_are_left_out():
    probs = torch.tensor([[0.2, 0.8, 0.0]] * 3)
    labels = torch.tensor([2, 2, 2])
    assert within_class_kl(probs, labels).tolist() == pytest.approx([0.0], abs=1e-12)
    assert len(class_entropy(probs, labels)) == 1


def test_describe_is_mean_population_variance_min_max():
    assert describe(torch.tensor([1.0, 2.0, 3.0, 4.0])) == {"mean": 2.5, "var": 1.25, "min": 1.0, "max": 4.0}
    stats = answer_statistics(PROBS, LABELS)
    assert stats["entropy"]["max"] == pytest.approx(0.5623351446188083)
    assert stats["within_class_kl"]["min"] == pytest.approx(0.0)


def test_over_seeds_uses_the_sample_standard_deviation():
    cell = over_seeds([0.5, 0.7])
    assert cell["mean"] == pytest.approx(0.6) and cell["std"] == pytest.approx(math.sqrt(0.02))
    assert over_seeds([0.3]) == {"mean": 0.3, "std": 0.0, "ci95": None, "values": [0.3]}  # no interval, no claim
    assert over_seeds([0.3], difference=True)["significant"] is None


def test_over_seeds_gives_the_t_interval_of_the_mean():
    # Three seeds: t(0.975, 2) = 4.3027; values 1, 2, 3 have std 1, so the half-width is 4.3027 / sqrt(3) = 2.484.
    cell = over_seeds([1.0, 2.0, 3.0], difference=True)
    assert cell["ci95"] == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    assert cell["significant"] is False  # 2 +- 2.48 holds 0
    # A paired difference steady over the seeds is told apart from 0.
    assert over_seeds([0.02, 0.03, 0.025], difference=True)["significant"] is True
    assert "significant" not in over_seeds([0.02, 0.03, 0.025])  # an accuracy is not a claim about 0
    # Many seeds: t(0.975, 99) = 1.9842.
    wide = over_seeds([float(i % 2) for i in range(100)])
    assert wide["ci95"] == pytest.approx(1.9842 * wide["std"] / 10, rel=1e-4)
    # scipy agrees, on the table and past it (where it is installed).
    stats = pytest.importorskip("scipy.stats")
    from evaluation.stats import t975
    for df in (1, 2, 5, 30, 31, 45, 60, 99, 1000):
        assert t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4), df


def test_entropy_histogram_counts_every_image_in_range():
    h = entropy_histogram(torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.9, 0.1]]), bins=4)
    assert sum(h["counts"]) == 3 and h["counts"][0] == 1 and h["counts"][-1] == 1
    assert h["edges"][-1] == pytest.approx(math.log(2))
