"""Distilling a student from a teacher's answers: the attacker's (clients/steal.py) and the evaluation's students.

What a thief fits, from the probabilities p a teacher returned (`--label-mode`):
- `soft`:  the probabilities as returned; the student at temperature T; T^2 * KL(p || softmax(s/T)).
- `logit`: undo the softmax first: z = log(max(p, 1e-8)) are the teacher's logits up to a constant, so
           softmax(z/T) is the teacher at temperature T, as in Hinton's KD; T^2 * KL(softmax(z/T) || softmax(s/T)).
           Classes a defense zeroed come back as tiny, equal logits.
- `hard`:  the top-1 only; cross-entropy.
With true labels (the paper's protocol): alpha * that + (1 - alpha) * CE(s, y).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.config import Config
from training.data import Batch, Split
from training.loop import fit
from training.losses import kl_divergence, sparse_topk_logits
from training.teachers import Context, Recipe

LABEL_MODES = ("soft", "logit", "hard")
LOGIT_FLOOR = 1e-8


def student_targets(probs: Tensor, mode: str, temperature: float) -> Tensor:
    """The distribution the student fits at temperature T (for `hard`: the one-hot top-1)."""
    if mode == "soft":
        return probs
    if mode == "logit":
        return torch.softmax(torch.log(probs.clamp_min(LOGIT_FLOOR)) / temperature, dim=1)
    if mode == "hard":
        return F.one_hot(probs.argmax(1), probs.shape[1]).to(probs.dtype)
    raise ValueError(f"unknown label mode {mode!r}; use one of {', '.join(LABEL_MODES)}")


def distill_loss(student_logits: Tensor, targets: Tensor, labels: Tensor | None, *, mode: str,
                 temperature: float, alpha: float) -> tuple[Tensor, dict[str, Tensor]]:
    """`targets` from student_targets; `labels` the true labels, or None when the thief has none."""
    if mode == "hard":
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
    if mode not in LABEL_MODES:
        raise ValueError(f"unknown label mode {mode!r}; use one of {', '.join(LABEL_MODES)}")

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


def train_student(model: nn.Module, cfg: Config, images: Tensor, probs: Tensor, labels: Tensor | None,
                  test: Split, out_dir: Path, *, mode: str, temperature: float, alpha: float,
                  device: torch.device, progress: bool = True) -> list[dict]:
    """Fit `model` to a teacher's answers `probs` on `images`. Without true labels, the teacher's top-1 stands in
    for them in the logged train accuracy (then: agreement with the teacher on the transfer set)."""
    targets = student_targets(probs.float(), mode, temperature)
    use_labels = labels is not None and alpha < 1
    y = labels if labels is not None else probs.argmax(1)
    recipe = student_recipe(mode, temperature, alpha, use_labels)
    return fit(model, recipe, Context(cfg, top_k=0), Split(images, y), test, out_dir, epochs=cfg.epochs,
               device=device, target=targets, progress=progress)
