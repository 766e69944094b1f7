"""PCGrad (Yu et al., NeurIPS 2020, "Gradient Surgery for Multi-Task Learning"): each objective's gradient loses its
component along any other objective's gradient it conflicts with (negative dot product), in a random order; the
projected gradients are averaged where every objective reaches a parameter and summed where only some do (as the
InI authors' implementation merges them)."""
from __future__ import annotations

import torch
from torch import Tensor


def flat_grad(loss: Tensor, params: list[Tensor], *, retain_graph: bool = True) -> tuple[Tensor, Tensor]:
    """The gradient of `loss` w.r.t. `params`, flattened, and a mask of the entries `loss` reaches at all."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])
    mask = torch.cat([torch.full((p.numel(),), g is not None, device=p.device) for g, p in zip(grads, params)])
    return flat, mask


def pcgrad(losses: list[Tensor], params: list[Tensor], generator: torch.Generator) -> list[Tensor]:
    """The merged, conflict-free gradient of `losses` w.r.t. `params`, shaped like them."""
    grads, masks = zip(*(flat_grad(loss, params) for loss in losses))
    projected = []
    for g in grads:
        g = g.clone()
        for j in torch.randperm(len(grads), generator=generator).tolist():
            dot = torch.dot(g, grads[j])
            if dot < 0:
                g -= dot * grads[j] / grads[j].norm() ** 2
        projected.append(g)
    stacked = torch.stack(projected)
    shared = torch.stack(masks).all(0)
    merged = torch.where(shared, stacked.mean(0), stacked.sum(0))
    out, i = [], 0
    for p in params:
        out.append(merged[i:i + p.numel()].view_as(p).clone())
        i += p.numel()
    return out
