"""The misinformation model of adaptive misinformation (Kariyappa & Qureshi, CVPR 2020): a model of the same task
trained to put little mass on the true class, `loss = -log(1 - p_y)`. It is never a teacher on its own: the service
serves it beside another model (`ASTGUARD_OUTPUT_DEFENSE=misinformation`), blending its answers into those to
queries that look out of distribution. Its card names the base model trained beside it, which it pairs with."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.data import Batch
from training.teachers import Context, Recipe, register_teacher


def misinformation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log(1 - p_y), batch mean; computed from log-probabilities (log1p(-exp(log p_y))) so it stays finite."""
    log_p_y = F.log_softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
    return -torch.log1p(-log_p_y.exp().clamp(max=1 - 1e-6)).mean()


def _misinformation(model: nn.Module, batch: Batch, ctx: Context):
    logits = model(batch.x)
    loss = misinformation_loss(logits, batch.y)
    return loss, {"misinformation": loss.detach()}, logits


register_teacher(Recipe("misinformation", "adaptive misinformation's second model (Kariyappa & Qureshi 2020): little "
                                          "mass on the true class, -log(1 - p_y); served beside another model",
                        _misinformation, row=False))
