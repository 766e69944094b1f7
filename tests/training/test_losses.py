"""Loss functions against values computed by hand.

Fixture: model probabilities p = (0.7, 0.2, 0.1); sparse target q = (0.5, 0.5, 0) (top-2, third class masked).
  epd-paper = e^.7 (.7-.5) + e^.2 (.2-.5) + e^.1 (.1-0)  = 0.402750 - 0.366421 + 0.110517 = 0.146847
  epd-code  = e^.5 (.5-.7) + e^.5 (.5-.2) + e^0 (0-.1)   = -0.329744 + 0.494616 - 0.1     = 0.064872
  kl(q||p)  = .5 ln(.5/.7) + .5 ln(.5/.2) + 0             = -0.168236 + 0.458145          = 0.289909
"""
import pytest
import torch

from training.losses import (DIVERGENCES, ast_loss, epd_paper, epd_released_code, kd_kl, kl_divergence,
                             nasty_loss, sparse_topk_logits, top_k_from_ratio)

P = torch.tensor([[0.7, 0.2, 0.1]])
Q = torch.tensor([[0.5, 0.5, 0.0]])
EPD_PAPER, EPD_CODE, KL_QP = 0.146847, 0.064872, 0.289909


def logs(p):
    return torch.log(p)  # log 0 = -inf, as a sparse target has


def test_sparse_topk_keeps_the_k_largest_logits_and_sets_the_rest_to_minus_infinity():
    out = sparse_topk_logits(torch.tensor([[1.0, 3.0, 2.0, 0.0], [5.0, -1.0, 4.0, 6.0]]), 2)
    inf = float("-inf")
    assert torch.equal(out, torch.tensor([[inf, 3.0, 2.0, inf], [5.0, inf, inf, 6.0]]))


def test_sparse_topk_keeps_exactly_k_even_with_ties():
    out = sparse_topk_logits(torch.ones(3, 10), 2)
    assert (torch.isfinite(out).sum(1) == 2).all()


@pytest.mark.parametrize("k", [0, 4])
def test_sparse_topk_rejects_k_outside_one_to_classes(k):
    with pytest.raises(ValueError, match="top-k"):
        sparse_topk_logits(torch.zeros(1, 3), k)


@pytest.mark.parametrize("ratio,classes,k", [(0.2, 10, 2), (0.07, 100, 7), (1.0, 10, 10), (0.01, 10, 1)])
def test_top_k_is_ratio_times_classes_at_least_one(ratio, classes, k):
    assert top_k_from_ratio(ratio, classes) == k


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_sparse_ratio_outside_zero_one_is_rejected(ratio):
    with pytest.raises(ValueError, match="ratio"):
        top_k_from_ratio(ratio, 10)


def test_epd_as_printed_in_the_paper_matches_the_hand_computed_value():
    assert epd_paper(logs(P), logs(Q)).item() == pytest.approx(EPD_PAPER, abs=1e-5)


def test_epd_as_in_the_released_code_matches_the_hand_computed_value():
    assert epd_released_code(logs(P), logs(Q)).item() == pytest.approx(EPD_CODE, abs=1e-5)


def test_epd_released_code_equals_kldivloss_with_log_target_fed_probabilities():
    # What the authors' code does: KLDivLoss(batchmean, log_target=True)(softmax(out/T), softmax(sparse/T)).
    p = torch.softmax(torch.randn(5, 10), 1)
    q = torch.softmax(sparse_topk_logits(torch.randn(5, 10), 3), 1)
    ref = torch.nn.KLDivLoss(reduction="batchmean", log_target=True)(p, q)
    assert epd_released_code(p.log(), q.log()).item() == pytest.approx(ref.item(), rel=1e-5)


def test_kl_is_target_to_model_and_finite_with_a_sparse_target():
    # KL(p||q) would be infinite here (q has a zero where p does not); KL(q||p) is the finite hand value.
    assert kl_divergence(logs(P), logs(Q)).item() == pytest.approx(KL_QP, abs=1e-5)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_every_divergence_is_zero_for_identical_distributions_and_averages_over_the_batch(name):
    d = DIVERGENCES[name]
    assert d(logs(P), logs(P)).item() == pytest.approx(0.0, abs=1e-7)
    assert d(logs(P.repeat(4, 1)), logs(Q.repeat(4, 1))).item() == pytest.approx(d(logs(P), logs(Q)).item())


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_every_divergence_has_finite_gradients_through_masked_classes(name):
    logits = torch.randn(4, 10, requires_grad=True)
    target = sparse_topk_logits(torch.randn(4, 10), 2)
    DIVERGENCES[name](torch.log_softmax(logits, 1), torch.log_softmax(target, 1)).backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name,value", [("epd-paper", EPD_PAPER), ("epd-code", EPD_CODE), ("kl", KL_QP)])
def test_ast_loss_scales_the_divergence_by_alpha_t_squared_at_temperature_t(name, value):
    t = 4.0
    logits = t * torch.log(P)  # softmax(logits / T) = P
    target = t * torch.log(torch.tensor([[0.5, 0.5, 1e-3]]))  # top-2 of it, at T, is Q
    labels = torch.tensor([0])
    only_div, terms = ast_loss(logits, target, labels, alpha=1.0, temperature=t, top_k=2, divergence=name)
    assert only_div.item() == pytest.approx(t * t * value, rel=1e-4)
    assert terms["divergence"].item() == pytest.approx(value, rel=1e-4)
    # CE is at T = 1: softmax(4 ln P) = P^4 / sum P^4, so CE = -ln(.2401 / (.2401 + .0016 + .0001)) = 0.0070555
    ce = 0.0070555
    only_ce, _ = ast_loss(logits, target, labels, alpha=0.0, temperature=t, top_k=2, divergence=name)
    assert only_ce.item() == pytest.approx(ce, rel=1e-4)
    mixed, _ = ast_loss(logits, target, labels, alpha=0.05, temperature=t, top_k=2, divergence=name)
    assert mixed.item() == pytest.approx(0.05 * t * t * value + 0.95 * ce, rel=1e-4)


def test_ast_loss_does_not_backpropagate_into_the_target():
    target = torch.randn(2, 5, requires_grad=True)
    loss, _ = ast_loss(torch.randn(2, 5, requires_grad=True), target, torch.tensor([0, 1]), alpha=0.5,
                       temperature=2.0, top_k=2, divergence="kl")
    loss.backward()
    assert target.grad is None


def test_kd_term_is_t_squared_times_kl_teacher_to_student():
    t = 2.0
    student, teacher = t * torch.log(P), t * torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    # KL(teacher||student) = .5 ln(.5/.7) + .3 ln(.3/.2) + .2 ln(.2/.1) = -0.168236 + 0.121640 + 0.138629
    assert kd_kl(student, teacher, t).item() == pytest.approx(t * t * 0.092033, rel=1e-4)


def test_nasty_loss_is_cross_entropy_minus_weighted_kl_of_the_nasty_model_to_the_base():
    t = 2.0
    logits, base = t * torch.log(P), t * torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor([1])).item()
    # The authors' direction, KL(f || base) = .7 ln(.7/.5) + .2 ln(.2/.3) + .1 ln(.1/.2) = 0.235531 - 0.081093 - 0.069315
    loss, terms = nasty_loss(logits, base, torch.tensor([1]), weight=0.5, temperature=t)
    assert loss.item() == pytest.approx(ce - 0.5 * t * t * 0.085123, rel=1e-4)
    # The reverse, KL(base || f): 0.092033 (see the kd term's test above)
    reverse, _ = nasty_loss(logits, base, torch.tensor([1]), weight=0.5, temperature=t, direction="reverse")
    assert reverse.item() == pytest.approx(ce - 0.5 * t * t * 0.092033, rel=1e-4)
    same, _ = nasty_loss(logits, logits, torch.tensor([1]), weight=0.5, temperature=t)
    assert same.item() == pytest.approx(ce, rel=1e-6)
    with pytest.raises(ValueError, match="direction"):
        nasty_loss(logits, base, torch.tensor([1]), weight=0.5, temperature=t, direction="sideways")


def test_nasty_loss_matches_kldivloss_called_as_the_authors_do_in_value_and_gradient():
    torch.manual_seed(0)
    t, w = 4.0, 0.04
    base = torch.randn(16, 10)
    labels = torch.randint(0, 10, (16,))
    ours_logits = torch.randn(16, 10, requires_grad=True)
    theirs_logits = ours_logits.detach().clone().requires_grad_(True)
    ours, terms = nasty_loss(ours_logits, base, labels, weight=w, temperature=t)
    F = torch.nn.functional
    # train_nasty.py: nn.KLDivLoss(reduction='batchmean')(log_softmax(output_stu/T), softmax(output_tch/T)) * T*T,
    # with output_stu the frozen base ("adversarial model") and output_tch the nasty teacher being trained.
    adv = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(base / t, dim=1),
                                                     F.softmax(theirs_logits / t, dim=1)) * (t * t)
    theirs = F.cross_entropy(theirs_logits, labels) - w * adv
    assert terms["kl_to_base"].item() == pytest.approx(adv.item(), rel=1e-5)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_logits.grad, theirs_logits.grad, rtol=1e-5, atol=1e-7)
