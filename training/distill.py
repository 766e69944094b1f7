"""What a student fits from a teacher's answers: the label modes (registry LABEL_MODES) and the distillation
recipes of the attacker's (clients/attack) and the evaluation's students.

A label mode turns the probabilities p a teacher returned into the student's targets, and says which loss fits
them: `kl` (T^2 * KL(targets || softmax(s/T))), `ce` (cross-entropy on the targets' argmax) or `l1` (the student's
logits regressed onto the targets). With true labels (the paper's protocol): alpha * that + (1 - alpha) * CE(s, y).
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

LOGIT_FLOOR = 1e-8  # `logit`: the floor of the first versions, kept so their results reproduce
RECOVERY_FLOOR = 1e-12  # `logit-kd`, `logit-l1`: float32 probabilities carry information down to about here


@dataclass(frozen=True)
class LabelMode:
    targets: Callable[[Tensor, float], Tensor]  # (probs, T) -> what the student fits
    loss: str = "kl"  # kl: the targets are a distribution at T; ce: their argmax; l1: logits to regress onto


def recovered_logits(probs: Tensor, floor: float = RECOVERY_FLOOR) -> Tensor:
    """log max(p, floor) minus its row mean: the teacher's logits up to a constant per row, exactly so when p is the
    full-precision softmax (the constant cancels in the mean); a class a defense zeroed comes back at log(floor)."""
    z = torch.log(probs.clamp_min(floor))
    return z - z.mean(1, keepdim=True)


LABEL_MODES: Registry[LabelMode] = Registry("label mode")
LABEL_MODES.register("soft", LabelMode(lambda p, t: p), params=("temperature",),
                     summary="the returned probabilities as they are, the student at T: `T^2 * KL(p || softmax(s/T))`")
LABEL_MODES.register("logit-kd", LabelMode(lambda p, t: torch.softmax(recovered_logits(p) / t, dim=1)),
                     params=("temperature",),
                     summary="undo the softmax first: `z = log max(p, 1e-12)` minus its row mean are the logits up "
                             "to a constant, so `softmax(z/T)` is the teacher at T, as in Hinton's KD")
LABEL_MODES.register("logit", LabelMode(lambda p, t: torch.softmax(torch.log(p.clamp_min(LOGIT_FLOOR)) / t, dim=1)),
                     params=("temperature",),
                     summary="`logit-kd` with the floor 1e-8 of earlier versions, kept so their results reproduce")
LABEL_MODES.register("logit-l1", LabelMode(lambda p, t: recovered_logits(p), loss="l1"),
                     summary="regress the student's logits onto the centred `z` with an L1 loss, as data-free "
                             "extraction code does")
LABEL_MODES.register("hard", LabelMode(lambda p, t: F.one_hot(p.argmax(1), p.shape[1]).to(p.dtype), loss="ce"),
                     summary="the top-1 only, with cross-entropy")


def student_targets(probs: Tensor, mode: str, temperature: float) -> Tensor:
    """What the student fits at temperature T (`hard`: the one-hot top-1; `logit-l1`: the centred logits)."""
    return LABEL_MODES[mode].targets(probs, temperature)


def distill_loss(student_logits: Tensor, targets: Tensor, labels: Tensor | None, *, mode: str,
                 temperature: float, alpha: float) -> tuple[Tensor, dict[str, Tensor]]:
    """`targets` from student_targets; `labels` the true labels, or None when the thief has none."""
    kind = LABEL_MODES[mode].loss
    if kind == "ce":
        kd = F.cross_entropy(student_logits, targets.argmax(1))
    elif kind == "l1":  # summed over classes, averaged over the batch: a gradient per logit of the size CE gives
        kd = (student_logits - targets).abs().sum(1).mean()
    else:
        t = temperature
        kd = t * t * kl_divergence(F.log_softmax(student_logits / t, dim=1), torch.log(targets))
    if labels is None or alpha >= 1:
        return kd, {"kd": kd.detach()}
    ce = F.cross_entropy(student_logits, labels)
    return alpha * kd + (1 - alpha) * ce, {"kd": kd.detach(), "ce": ce.detach()}


def student_recipe(mode: str, temperature: float, alpha: float, use_labels: bool, *,
                   from_probs: bool = False) -> Recipe:
    """A Recipe for the training loop; batch.target holds student_targets(...) (or, with `from_probs`, the raw
    probabilities, turned into targets batch by batch: students of other modes or temperatures can then share one
    loader), batch.y the true labels."""
    LABEL_MODES.entry(mode)  # an unknown mode fails now, not at the first batch

    def loss(model: nn.Module, batch: Batch, ctx: Context):
        logits = model(batch.x)
        targets = student_targets(batch.target, mode, temperature) if from_probs else batch.target
        total, terms = distill_loss(logits, targets, batch.y if use_labels else None, mode=mode,
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
