"""LTD, Low Temperature Distillation for robust adversarial training (Chen & Lee, arXiv 2111.02331).

The text of the paper is not on this machine; this follows its abstract, and every choice is named:
- PGD adversarial training (L-inf, `ltd_eps` / `ltd_step` / `ltd_steps`; 8/255, 2/255, 10 steps in the CIFAR
  presets, 0.1 / 0.025 / 10 on digits), the examples maximising the cross-entropy on the true labels (Madry et al.),
  from a random start, against the model being trained (in eval mode);
- on the soft labels of the trained base at a low temperature, `softmax(base(x) / T_teacher)` (T_teacher 0.5: our
  choice of "relatively low"), fitted by the new model at its fixed, different temperature T_student (1.0, which
  the exported model keeps, so its served softmax is the one it was trained at):
      L = T_s^2 * KL(softmax(base(x)/T_t) || softmax(f(x_adv)/T_s)) + w_clean * (the same on x)
  with w_clean 0 by default (the abstract names no clean term).
The published anchors (RobustBench, CIFAR-10, AutoAttack): WRN-34-10 85.21% clean / 56.94% robust; WRN-34-20
86.03% / 57.71%, with the authors' full method (combined with other techniques), not this reading of it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.data import Batch
from training.losses import kl_divergence
from training.pgd import pgd_linf
from training.teachers import Context, Recipe, register_teacher


def ltd_loss(logits, teacher_logits, *, teacher_temperature: float, student_temperature: float):
    t_t, t_s = teacher_temperature, student_temperature
    target = F.log_softmax(teacher_logits.detach() / t_t, dim=1)
    return t_s * t_s * kl_divergence(F.log_softmax(logits / t_s, dim=1), target)


def _ltd(model: nn.Module, batch: Batch, ctx: Context):
    cfg = ctx.cfg
    with torch.no_grad():
        teacher = ctx.base(batch.x)
    # A generator seeded by the batch: the same random starts after a resume.
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + int(batch.index[:8].sum()))
    model.eval()
    x_adv = pgd_linf(model, batch.x, batch.y, eps=cfg.ltd_eps, step=cfg.ltd_step, steps=cfg.ltd_steps,
                     random_start=True, generator=g)
    model.train()
    kw = dict(teacher_temperature=cfg.ltd_teacher_temperature, student_temperature=cfg.ltd_student_temperature)
    robust = ltd_loss(model(x_adv), teacher, **kw)
    if cfg.ltd_clean_weight:
        logits = model(batch.x)
        clean = ltd_loss(logits, teacher, **kw)
        loss = robust + cfg.ltd_clean_weight * clean
        terms = {"robust_kd": robust.detach(), "clean_kd": clean.detach()}
    else:
        with torch.no_grad():  # for the logged train accuracy only
            logits = model(batch.x)
        loss, terms = robust, {"robust_kd": robust.detach()}
    return loss, terms, logits


register_teacher(Recipe("ltd", "LTD (Chen & Lee): PGD adversarial training on the base's soft labels at a low "
                               "temperature, the model at a fixed, different one",
                        _ltd, ("ltd_teacher_temperature", "ltd_student_temperature", "ltd_clean_weight", "ltd_eps",
                               "ltd_step", "ltd_steps"), needs_base=True, single_process=True))
