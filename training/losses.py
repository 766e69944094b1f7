"""Loss functions of the teacher recipes (Yilmaz & Keles, Adversarial Sparse Teacher; Ma et al., Nasty Teacher).

AST:  L = a * T^2 * D(softmax(f(x)/T), softmax(sparse_k(f(x_adv))/T)) + (1 - a) * CE(f(x), y)

D is one of three named divergences, all averaged over the batch ("batchmean"), all taking the model's and the
target's temperature-scaled *log*-probabilities (log_p, log_q) so that masked classes (q = 0, log q = -inf) are exact:
- `epd-paper`: sum_i e^{p_i} (p_i - q_i), with p, q the probabilities: the formula as printed in the paper.
- `epd-code`:  sum_i e^{q_i} (q_i - p_i), with p, q the probabilities: what the authors' released code computes,
  since it passes softmax outputs (not log-softmax) to KLDivLoss(reduction="batchmean", log_target=True).
  The paper's reported numbers come from this form.
- `kl`:        KL(q || p) = sum_i q_i (log q_i - log p_i): the divergence the two EPD forms stand in for.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from astguard.registry import Registry


def sparse_topk_logits(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row and set the rest to -inf (exactly k kept, ties broken by topk)."""
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"top-k must be in [1, {logits.shape[1]}], got {k}")
    values, index = logits.topk(k, dim=1)
    return torch.full_like(logits, float("-inf")).scatter(1, index, values)


def top_k_from_ratio(ratio: float, num_classes: int) -> int:
    """k = ratio x classes, at least 1 (paper: 0.2 x 10 = 2 on CIFAR-10, 0.07 x 100 = 7 on CIFAR-100)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"sparse ratio must be in (0, 1], got {ratio}")
    return max(1, min(num_classes, round(ratio * num_classes)))


def epd_paper(log_p: Tensor, log_q: Tensor) -> Tensor:
    p, q = log_p.exp(), log_q.exp()
    return (p.exp() * (p - q)).sum(1).mean()


def epd_released_code(log_p: Tensor, log_q: Tensor) -> Tensor:
    p, q = log_p.exp(), log_q.exp()
    return (q.exp() * (q - p)).sum(1).mean()


def kl_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(q || p); xlogy makes the masked terms 0 * log 0 = 0 instead of NaN."""
    q = log_q.exp()
    return (torch.special.xlogy(q, q) - q * log_p).sum(1).mean()


DIVERGENCES: Registry[Callable[[Tensor, Tensor], Tensor]] = Registry("divergence")
DIVERGENCES.register("epd-paper", epd_paper, summary="`sum_i e^{p_i} (p_i - q_i)`: the EPD as printed in the paper")
DIVERGENCES.register("epd-code", epd_released_code,
                     summary="`sum_i e^{q_i} (q_i - p_i)`: what the authors' released code computes (softmax outputs "
                             "fed to `KLDivLoss(reduction=\"batchmean\", log_target=True)`); the paper's numbers "
                             "come from this form")
DIVERGENCES.register("kl", kl_divergence,
                     summary="`sum_i q_i (log q_i - log p_i)`: KL(target || model), masked classes contributing "
                             "exactly 0")


def ast_loss(logits: Tensor, target_logits: Tensor, labels: Tensor, *, alpha: float, temperature: float,
             top_k: int, divergence: str) -> tuple[Tensor, dict[str, Tensor]]:
    """The AST objective; `target_logits` is the sparse target's source (AST: f(x_adv), STT: base(x)), no grad."""
    t = temperature
    log_p = F.log_softmax(logits / t, dim=1)
    log_q = F.log_softmax(sparse_topk_logits(target_logits.detach(), top_k) / t, dim=1)
    d = DIVERGENCES[divergence](log_p, log_q)
    ce = F.cross_entropy(logits, labels)
    return alpha * t * t * d + (1 - alpha) * ce, {"divergence": d.detach(), "ce": ce.detach()}


def kd_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton KD term: T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch mean."""
    t = temperature
    log_q = F.log_softmax(teacher_logits.detach() / t, dim=1)
    return t * t * kl_divergence(F.log_softmax(student_logits / t, dim=1), log_q)


NT_DIRECTIONS = ("authors", "reverse")


def nasty_loss(logits: Tensor, base_logits: Tensor, labels: Tensor, *, weight: float, temperature: float,
               direction: str = "authors") -> tuple[Tensor, dict[str, Tensor]]:
    """Nasty Teacher: CE(f(x), y) - w * T^2 * KL, the KL between the nasty model f and the frozen base, per sample
    summed over classes and averaged over the batch.

    - `authors` (VITA-Group/Nasty-Teacher, train_nasty.py): `KLDivLoss(reduction="batchmean")(log_softmax(base/T),
      softmax(f/T)) * T^2`, which is KL(softmax(f/T) || softmax(base/T)), the gradient flowing through f's own
      distribution;
    - `reverse`: KL(softmax(base/T) || softmax(f/T)), the usual distillation direction (astguard's earlier form).
    """
    if direction not in NT_DIRECTIONS:
        raise ValueError(f"unknown Nasty Teacher direction {direction!r}; choose one of {', '.join(NT_DIRECTIONS)}")
    ce = F.cross_entropy(logits, labels)
    t = temperature
    if direction == "authors":
        log_p = F.log_softmax(logits / t, dim=1)
        log_q = F.log_softmax(base_logits.detach() / t, dim=1)
        kl = t * t * (log_p.exp() * (log_p - log_q)).sum(1).mean()
    else:
        kl = kd_kl(logits, base_logits, temperature)
    return ce - weight * kl, {"ce": ce.detach(), "kl_to_base": kl.detach()}
