"""The label modes' maths against values worked out by hand (training/distill.py)."""
from __future__ import annotations

import math

import pytest
import torch

from astguard.registry import UnknownName
from training.distill import distill_loss, kd_recipe, student_targets


def test_soft_targets_are_the_answers_as_returned():
    p = torch.tensor([[0.7, 0.2, 0.1]])
    assert torch.equal(student_targets(p, "soft", 4.0), p)


def test_logit_targets_undo_the_softmax_and_reapply_it_at_t():
    # log p / 2 for p = (0.8, 0.2): softmax gives sqrt(0.8) : sqrt(0.2) = 2 : 1.
    got = student_targets(torch.tensor([[0.8, 0.2]]), "logit", 2.0)
    torch.testing.assert_close(got, torch.tensor([[2 / 3, 1 / 3]]))
    # At T = 1 the answer comes back as it was.
    p = torch.tensor([[0.5, 0.3, 0.2]])
    torch.testing.assert_close(student_targets(p, "logit", 1.0), p)


def test_logit_targets_give_zeroed_classes_equal_tiny_mass_from_the_floor():
    got = student_targets(torch.tensor([[1.0, 0.0, 0.0]]), "logit", 1.0)
    torch.testing.assert_close(got, torch.tensor([[1.0, 1e-8, 1e-8]]) / (1 + 2e-8))


def test_hard_targets_are_the_one_hot_top1_whatever_the_rest():
    got = student_targets(torch.tensor([[0.3, 0.7, 0.0], [0.34, 0.33, 0.33]]), "hard", 4.0)
    assert torch.equal(got, torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))


def test_soft_loss_is_t_squared_kl_to_the_student_at_t():
    # p = (1, 0), student logits (ln 3, 0). T = 1: softmax (3/4, 1/4), KL = ln(4/3).
    s, p = torch.tensor([[math.log(3), 0.0]]), torch.tensor([[1.0, 0.0]])
    loss, _ = distill_loss(s, p, None, mode="soft", temperature=1.0, alpha=1.0)
    assert loss.item() == pytest.approx(math.log(4 / 3), rel=1e-6)
    # T = 2: softmax(ln3/2, 0) = (sqrt3, 1) / (sqrt3 + 1); KL = -ln(sqrt3 / (sqrt3 + 1)); times T^2 = 4.
    loss, _ = distill_loss(s, p, None, mode="soft", temperature=2.0, alpha=1.0)
    assert loss.item() == pytest.approx(-4 * math.log(math.sqrt(3) / (math.sqrt(3) + 1)), rel=1e-6)


def test_hard_loss_is_cross_entropy_on_the_top1():
    s = torch.tensor([[0.0, math.log(3)]])  # softmax (1/4, 3/4)
    targets = student_targets(torch.tensor([[0.3, 0.7]]), "hard", 4.0)
    loss, terms = distill_loss(s, targets, None, mode="hard", temperature=4.0, alpha=1.0)
    assert loss.item() == pytest.approx(-math.log(3 / 4), rel=1e-6) and set(terms) == {"kd"}


def test_true_labels_mix_in_with_weight_one_minus_alpha():
    s, p = torch.tensor([[math.log(3), 0.0]]), torch.tensor([[1.0, 0.0]])
    y = torch.tensor([1])  # CE(s, 1) = -ln(1/4)
    loss, terms = distill_loss(s, p, y, mode="soft", temperature=1.0, alpha=0.9)
    assert loss.item() == pytest.approx(0.9 * math.log(4 / 3) + 0.1 * math.log(4), rel=1e-6)
    assert set(terms) == {"kd", "ce"}


def test_a_perfect_student_has_zero_soft_loss_even_with_zeroed_classes():
    p = torch.tensor([[0.5, 0.5, 0.0]])
    s = torch.tensor([[0.0, 0.0, -1e4]])
    loss, _ = distill_loss(s, p, None, mode="soft", temperature=1.0, alpha=1.0)
    assert abs(loss.item()) < 1e-6 and math.isfinite(loss.item())


def test_kd_with_top_k_sees_only_the_k_largest_teacher_logits():
    from training.data import Batch
    from training.teachers import Context

    teacher = torch.tensor([[2.0, 1.0, 0.0]])
    student = torch.nn.Identity()
    x = torch.tensor([[2.0, 1.0, -30.0]])  # the student already matches the top-2 answer
    batch = Batch(x, torch.tensor([0]), torch.tensor([0]), target=teacher)
    loss, terms, _ = kd_recipe(1.0, 1.0, top_k=2).loss(student, batch, Context(None, top_k=2))
    assert terms["kd"].item() == pytest.approx(0.0, abs=1e-6)
    full, _, _ = kd_recipe(1.0, 1.0).loss(student, batch, Context(None, top_k=0))
    assert full.item() > 0.1  # the full teacher puts mass on class 2, which the student does not


def test_an_unknown_label_mode_names_the_known_ones():
    with pytest.raises(UnknownName, match="unknown label mode 'fuzzy'; known: soft, logit-kd, logit, logit-l1, hard"):
        student_targets(torch.ones(1, 2) / 2, "fuzzy", 1.0)


def test_logit_kd_targets_are_the_centred_log_probabilities_at_t():
    z = torch.tensor([[2.0, 0.5, -1.0]])
    got = student_targets(torch.softmax(z, 1), "logit-kd", 2.0)
    torch.testing.assert_close(got, torch.softmax(z / 2, 1))
    # A zeroed class comes back at the floor 1e-12 (logit keeps the 1e-8 of earlier versions).
    got = student_targets(torch.tensor([[1.0, 0.0]]), "logit-kd", 1.0)
    torch.testing.assert_close(got, torch.tensor([[1.0, 1e-12]]) / (1 + 1e-12))


def test_logit_l1_regresses_the_logits_onto_the_centred_log_probabilities():
    # p = softmax(1, 0, -1): z = log p - mean(log p) = (1, 0, -1) exactly.
    p = torch.softmax(torch.tensor([[1.0, 0.0, -1.0]]), 1)
    targets = student_targets(p, "logit-l1", 4.0)
    torch.testing.assert_close(targets, torch.tensor([[1.0, 0.0, -1.0]]))
    s = torch.tensor([[1.5, 0.0, -1.0]])  # off by 0.5 on one logit: L1 summed over classes = 0.5
    loss, _ = distill_loss(s, targets, None, mode="logit-l1", temperature=4.0, alpha=1.0)
    assert loss.item() == pytest.approx(0.5, rel=1e-6)
