"""The skeptical student (Kundu et al., NeurIPS 2021, "Analyzing the Confidentiality of Undistillable Teachers"):
the victim's knowledge goes into a shallow auxiliary head after an early stage only, so whatever misleading
structure a defended teacher plants in its answers reaches the shared early layers but not the final head, which
learns from the argmax labels and from self-distillation between the heads.

Loss, as in the authors' released code (train_kd_to_SD.py), with no true labels (y: the victim's top-1):
    alpha * T^2 * KL(victim^T || early^T) + (1 - alpha) * CE(early, y)         the victim, into the early head
  + 0.3 * KL(softmax(final/T) || softmax(late/T)) + 0.7 * CE(late, y)          a late head learns from the final one
  + CE(final, y)                                                               the final head: the labels only
The paper's networks carry several auxiliary heads with attention modules; here any architecture of the registry
gets two shallow heads (1x1 conv -> BN -> ReLU -> global pool -> linear), placed by a hook on the network's main
path (its layers and blocks in order, a residual block as one step): the early one after the first step that
downsamples, the late one after the last feature map. The released code delays the KD term by
`kd_delay` epochs; here it starts at once (the delay is not in the released parameter files).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clients.attack.attacks import Setting, Stolen, register_attack
from clients.attack.student import StudentSpec, new_student
from training.data import Batch, Split
from training.loop import fit
from training.losses import kl_divergence
from training.teachers import Context, Recipe


def _main_path(module: nn.Module):
    """The modules a forward pass runs one after another: the children of `module`, looking through Sequentials but
    not into other modules (a residual block is one step; its shortcut is not on the path)."""
    for child in module.children():
        if isinstance(child, nn.Sequential):
            yield from _main_path(child)
        else:
            yield child


def _stages(body: nn.Module, sample: Tensor) -> list[tuple[nn.Module, torch.Size]]:
    """The modules on the body's main path that give a feature map, in the order they run, with their output
    shapes (one forward pass of `sample`)."""
    found, hooks = [], []
    for m in _main_path(body):
        hooks.append(m.register_forward_hook(lambda mod, inp, out: found.append((mod, out.shape))
                                             if out.dim() == 4 else None))
    try:
        body.eval()
        with torch.no_grad():
            body(sample)
    finally:
        for h in hooks:
            h.remove()
    seen, ordered = set(), []
    for mod, shape in found:  # a module that runs twice (shared) counts once, where it first ran
        if id(mod) not in seen:
            seen.add(id(mod))
            ordered.append((mod, shape))
    return ordered


def _head(channels: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, classes))


class SkepticalStudent(nn.Module):
    """A registry student with two auxiliary heads; forward returns the final head's logits (what is evaluated and
    what a thief would deploy) and keeps the heads' logits of the same pass in `self.heads`."""

    def __init__(self, student: nn.Module, classes: int, sample: Tensor):
        super().__init__()
        self.student = student
        body = student.body if hasattr(student, "body") else student
        stages = _stages(body, sample)
        side = sample.shape[-1]
        early = next(((m, s) for m, s in stages if s[-1] < side), stages[0])
        late = next((st for st in reversed(stages) if st[1][-1] > 1), stages[-1])  # before any global pooling
        self.early_head, self.late_head = _head(early[1][1], classes), _head(late[1][1], classes)
        self._features: dict[str, Tensor] = {}
        early[0].register_forward_hook(lambda mod, inp, out: self._features.__setitem__("early", out))
        late[0].register_forward_hook(lambda mod, inp, out: self._features.__setitem__("late", out))
        self.heads: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        final = self.student(x)
        self.heads = (self.early_head(self._features["early"]), self.late_head(self._features["late"]))
        return final


def skeptical_loss(final: Tensor, early: Tensor, late: Tensor, victim: Tensor, y: Tensor, *, temperature: float,
                   alpha: float) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss above; `victim` the victim's probabilities at T (its answers, softened as the thief chooses)."""
    t = temperature
    kd = t * t * kl_divergence(F.log_softmax(early / t, dim=1), torch.log(victim))
    early_term = alpha * kd + (1 - alpha) * F.cross_entropy(early, y)
    self_kd = kl_divergence(F.log_softmax(late / t, dim=1), F.log_softmax(final / t, dim=1))
    late_term = 0.3 * self_kd + 0.7 * F.cross_entropy(late, y)
    final_term = F.cross_entropy(final, y)
    return early_term + late_term + final_term, {"kd_early": kd.detach(), "self_kd": self_kd.detach(),
                                                 "ce_final": final_term.detach()}


def skeptical_recipe(temperature: float, alpha: float) -> Recipe:
    """batch.target: the victim's answers at T; batch.y: its top-1."""
    def loss(model: nn.Module, batch: Batch, ctx: Context):
        final = model(batch.x)
        early, late = (model.module if hasattr(model, "module") else model).heads
        total, terms = skeptical_loss(final, early, late, batch.target, batch.y, temperature=temperature,
                                      alpha=alpha)
        return total, terms, final

    return Recipe("skeptical", "victim into an early head, labels into the final one", loss)


def train_skeptical(spec: StudentSpec, images: Tensor, probs: Tensor, test: Split, out_dir: Path, *,
                    temperature: float, alpha: float, device: torch.device, progress: bool = False) -> nn.Module:
    student = new_student(spec, images, probs.shape[1], torch.device("cpu"))
    model = SkepticalStudent(student, probs.shape[1], images[:2].float() / 255).to(device)
    softened = torch.softmax(torch.log(probs.float().clamp_min(1e-12)) / temperature, dim=1)
    fit(model, skeptical_recipe(temperature, alpha), Context(spec.config(), top_k=0), Split(images, probs.argmax(1)),
        test, out_dir, epochs=spec.epochs, device=device, target=softened, progress=progress)
    return model


def skeptical(setting: Setting, alpha: float = 0.9) -> Stolen:
    images, probs, _ = setting.bought()
    model = train_skeptical(setting.spec, images, probs, setting.fallback_test(images, probs), setting.out / "student",
                            temperature=setting.temperature, alpha=alpha, device=setting.device,
                            progress=setting.progress)
    return Stolen(model)


register_attack("skeptical", skeptical,
                summary="Kundu et al. 2021: the victim distilled into a shallow early head only; the final head "
                        "learns from the victim's top-1 and from self-distillation between heads",
                assumes="a data set to query", cost="the shared queries only", alpha=0.9)
