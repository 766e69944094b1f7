"""Fitting a student to bought answers, and measuring what was stolen."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.config import Config, make_config
from training.data import Split, channel_stats
from training.distill import student_recipe, student_targets
from training.loop import Member, fit, fit_group, predict_logits
from training.models import create_model
from training.teachers import Context, Recipe


def distillation(probs: Tensor, labels: Tensor | None, *, mode: str, temperature: float, alpha: float = 1.0
                 ) -> tuple[Recipe, Tensor, Tensor]:
    """What a student trains on, from a victim's answers `probs`: the recipe, the per-image targets (for
    Batch.target) and the labels the loop sees. `labels` are the thief's true labels, mixed in with weight 1 - alpha;
    without them the victim's top-1 stands in for them in the logged train accuracy (then: agreement with the
    victim on the transfer set)."""
    use_labels = labels is not None and alpha < 1
    recipe = student_recipe(mode, temperature, alpha, use_labels)
    targets = student_targets(probs.float(), mode, temperature)
    return recipe, targets, labels if labels is not None else probs.argmax(1)


@dataclass(frozen=True)
class StudentSpec:
    """The thief's student and how it trains. `base` is a whole training configuration to start from (the
    evaluation's students share its schedule and optimiser settings); `mean`/`std` fix the student's input
    normalisation (default: the statistics of the images it trains on)."""
    arch: str
    epochs: int = 20
    lr: float = 0.05
    batch_size: int = 64
    crop_pad: int = 1
    flip: bool = False
    seed: int = 0
    base: Config | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def config(self) -> Config:
        fields = dict(arch=self.arch, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                      crop_pad=self.crop_pad, flip=self.flip, seed=self.seed)
        return replace(self.base, **fields) if self.base is not None else make_config(**fields)


def new_student(spec: StudentSpec, images: Tensor, classes: int, device: torch.device) -> nn.Module:
    """A fresh student of the victim's input shape, normalised by the statistics of the thief's own images."""
    mean, std = (spec.mean, spec.std) if spec.mean is not None else channel_stats(images)
    torch.manual_seed(spec.seed)
    return create_model(spec.arch, classes, images.shape[1], images.shape[2], mean, std).to(device)


def distill_student(spec: StudentSpec, images: Tensor, probs: Tensor, labels: Tensor | None, test: Split,
                    out_dir: Path, *, mode: str, temperature: float, alpha: float = 1.0, device: torch.device,
                    progress: bool = True) -> tuple[nn.Module, list[dict]]:
    """A student fitted to the victim's answers `probs` on `images`; returns it and its per-epoch history."""
    if len(images) == 0:
        raise ValueError("no answered queries to train a student on")
    model = new_student(spec, images, probs.shape[1], device)
    recipe, targets, y = distillation(probs, labels, mode=mode, temperature=temperature, alpha=alpha)
    cfg = spec.config()
    history = fit(model, recipe, Context(cfg, top_k=0), Split(images, y), test, out_dir, epochs=cfg.epochs,
                  device=device, target=targets, progress=progress)
    return model, history


def distill_group(spec: StudentSpec, images: Tensor, probs: Tensor, members: dict, test: Split, out_dir: Path, *,
                  device: torch.device, progress: bool = True) -> dict:
    """Students that differ only in how they treat the same answers, `members[key] = (label mode, T)`, trained in
    lockstep on the same batches (each as if alone: same initialisation, its own random stream); returns them by
    key."""
    cfg = spec.config()
    group = {}
    for key, (mode, temperature) in members.items():
        recipe = student_recipe(mode, temperature, 1.0, False, from_probs=True)
        group[key] = Member(new_student(spec, images, probs.shape[1], device), recipe, Context(cfg, 0),
                            out_dir / f"student-{key}")
    fit_group(list(group.values()), Split(images, probs.argmax(1)), test, epochs=cfg.epochs, device=device,
              target=probs.float(), progress=progress)
    return {key: m.model for key, m in group.items()}


def reference_student(spec: StudentSpec, images: Tensor, labels: Tensor, classes: int, test: Split, out_dir: Path, *,
                      device: torch.device, progress: bool = True) -> nn.Module:
    """The same student trained on the same images with their true labels: what a thief with labels would not need
    to steal."""
    onehot = F.one_hot(labels, classes).float()
    model, _ = distill_student(spec, images, onehot, labels, test, out_dir, mode="hard", temperature=1.0,
                               device=device, progress=progress)
    return model


def kl_victim_student(victim: np.ndarray, student_logits: Tensor) -> float:
    """Mean KL(victim || student) in nats, with 0 log 0 = 0 where a defense zeroed classes."""
    p = torch.from_numpy(victim).double()
    log_q = F.log_softmax(student_logits.double(), dim=1)
    return float((torch.special.xlogy(p, p) - p * log_q).sum(1).mean())


def score(student: nn.Module, test: Split, victim_answers: np.ndarray | None, device: torch.device) -> dict:
    """The student's accuracy on the thief's labelled test set, and, with the victim's answers on it, the victim's
    accuracy, the student's top-1 agreement with the victim and KL(victim || student)."""
    logits = predict_logits(student, test.images, device)
    out = {"student_accuracy": _rate(logits.argmax(1) == test.labels)}
    if victim_answers is not None:
        victim_top1 = torch.from_numpy(victim_answers.argmax(1))
        out.update(victim_accuracy=_rate(victim_top1 == test.labels), agreement=_rate(logits.argmax(1) == victim_top1),
                   kl=round(kl_victim_student(victim_answers, logits), 4))
    return out


def _rate(hits: Tensor) -> float:
    return round(float(hits.float().mean()), 4)
