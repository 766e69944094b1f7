"""What a student fits from a teacher's answers: the label modes and the distillation recipes of the attacker's
(clients/attack) and the evaluation's students.

What a thief fits, from the probabilities p a teacher returned (`--label-mode`):
- `soft`:  the probabilities as returned; the student at temperature T; T^2 * KL(p || softmax(s/T)).
- `logit`: undo the softmax first: z = log(max(p, 1e-8)) are the teacher's logits up to a constant, so
           softmax(z/T) is the teacher at temperature T, as in Hinton's KD; T^2 * KL(softmax(z/T) || softmax(s/T)).
           Classes a defense zeroed come back as tiny, equal logits.
- `hard`:  the top-1 only; cross-entropy.
With true labels (the paper's protocol): alpha * that + (1 - alpha) * CE(s, y).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from astguard.registry import Registry
from training.data import Batch
from training.losses import kl_divergence, sparse_topk_logits
from training.teachers import Context, Recipe

LOGIT_FLOOR = 1e-8


@dataclass(frozen=True)
class LabelMode:
    targets: Callable[[Tensor, float], Tensor]  # (probs, T) -> the distribution the student fits at T
    hard: bool = False  # fit the targets' argmax with cross-entropy, not the distribution with KL


LABEL_MODES: Registry[LabelMode] = Registry("label mode")
LABEL_MODES.register("soft", LabelMode(lambda p, t: p), params=("temperature",),
                     summary="the returned probabilities as they are, the student at T: `T^2 * KL(p || softmax(s/T))`")
LABEL_MODES.register("logit", LabelMode(lambda p, t: torch.softmax(torch.log(p.clamp_min(LOGIT_FLOOR)) / t, dim=1)),
                     params=("temperature",),
                     summary="undo the softmax first: `log max(p, 1e-8)` are the logits up to a constant, so "
                             "`softmax(z/T)` is the teacher at T, as in Hinton's KD")
LABEL_MODES.register("hard", LabelMode(lambda p, t: F.one_hot(p.argmax(1), p.shape[1]).to(p.dtype), hard=True),
                     summary="the top-1 only, with cross-entropy")


def student_targets(probs: Tensor, mode: str, temperature: float) -> Tensor:
    """The distribution the student fits at temperature T (for `hard`: the one-hot top-1)."""
    return LABEL_MODES[mode].targets(probs, temperature)


def distill_loss(student_logits: Tensor, targets: Tensor, labels: Tensor | None, *, mode: str,
                 temperature: float, alpha: float) -> tuple[Tensor, dict[str, Tensor]]:
    """`targets` from student_targets; `labels` the true labels, or None when the thief has none."""
    if LABEL_MODES[mode].hard:
        kd = F.cross_entropy(student_logits, targets.argmax(1))
    else:
        t = temperature
        kd = t * t * kl_divergence(F.log_softmax(student_logits / t, dim=1), torch.log(targets))
    if labels is None or alpha >= 1:
        return kd, {"kd": kd.detach()}
    ce = F.cross_entropy(student_logits, labels)
    return alpha * kd + (1 - alpha) * ce, {"kd": kd.detach(), "ce": ce.detach()}


def student_recipe(mode: str, temperature: float, alpha: float, use_labels: bool) -> Recipe:
    """A Recipe for the training loop; batch.target holds student_targets(...), batch.y the true labels."""
    LABEL_MODES.entry(mode)  # an unknown mode fails now, not at the first batch

    def loss(model: nn.Module, batch: Batch, ctx: Context):
        logits = model(batch.x)
        total, terms = distill_loss(logits, batch.target, batch.y if use_labels else None, mode=mode,
                                    temperature=temperature, alpha=alpha)
        return total, terms, logits

    return Recipe(f"student-{mode}", f"distilled from {mode} answers", loss)


def kd_recipe(temperature: float, alpha: float, top_k: int | None = None) -> Recipe:
    """The paper's protocol (Hinton KD with labels): batch.target holds the teacher's logits on batch.x, which
    the student fits at temperature T; `top_k` keeps only the k largest (Stingy Teacher at distillation time)."""
    def loss(model: nn.Module, batch: Batch, ctx: Context):
        teacher = batch.target if top_k is None else sparse_topk_logits(batch.target, top_k)
        logits = model(batch.x)
        total, terms = distill_loss(logits, torch.softmax(teacher / temperature, dim=1), batch.y, mode="soft",
                                    temperature=temperature, alpha=alpha)
        return total, terms, logits

    return Recipe("kd" if top_k is None else f"kd-top{top_k}", "distilled from a teacher's logits", loss)
