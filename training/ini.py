"""InI, Isolation and Induction (Guo et al., ACM MM 2023): a victim V trained so that a thief's gradients point
away from the victim's knowledge.

A clone S of V's architecture, randomly initialised and never trained (eval mode), stands for the thief. Per step,
with an in-distribution batch x (labels y) and an out-of-distribution batch u of the same size:

    L = CE(V(x), y)                                               benign accuracy
      - beta  * d(V(x), S(x))                                     in-distribution push (beta 0 by default)
      + gamma * d(V(u), S(u))                                     induction: uninformative answers out of distribution
      + delta * cos(grad_S KL(S(x)||V(x)), grad_S CE(S(x), y))    isolation: the thief's gradient away from the labels'
      + eps   * mean|grad_S KL(S(u)||V(u))|                       the thief learns little from OOD queries

with d(a, b) = mean |b - (log_softmax(a) - mean_c log_softmax(a))| (S's raw logits against V's centred
log-probabilities, S detached). The gradients are with respect to S's parameters; the first of the cosine and the
OOD one are kept in the graph (double backpropagation, so they reach V), the second of the cosine is detached.
With PCGrad (the default) the weighted terms' gradients on V are merged by gradient surgery; without it, their sum
is clipped to norm 10. As read in the authors' code (sharinka0715/InI-Model-Stealing-Defense, `src/defenses/ini/
ini.py`, `run.sh`): gamma 0.3, delta 1, eps 1000, beta 0, PCGrad on; the optimiser there is SGD lr 0.1, momentum 0.5,
weight decay 1e-3 for 150 epochs, x0.1 every 50 (the `cifar10-ini` preset).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.data import Batch
from training.pcgrad import pcgrad
from training.teachers import Context, Recipe, register_teacher


def centred_log_softmax(logits: Tensor) -> Tensor:
    log_p = F.log_softmax(logits, dim=1)
    return log_p - log_p.mean(1, keepdim=True)


def distance(victim_logits: Tensor, shadow_logits: Tensor) -> Tensor:
    """d(V, S) = mean |S - (log_softmax(V) - its mean)|, S as given (the caller detaches it)."""
    return (shadow_logits - centred_log_softmax(victim_logits)).abs().mean()


def kl_to(source_logits: Tensor, target_logits: Tensor) -> Tensor:
    """KL(softmax(source) || softmax(target)), batch mean."""
    log_s = F.log_softmax(source_logits, dim=1)
    return (log_s.exp() * (log_s - F.log_softmax(target_logits, dim=1))).sum(1).mean()


def ini_terms(victim: nn.Module, shadow: nn.Module, x: Tensor, y: Tensor, u: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Every term of the loss (unweighted, with their graphs) and V's logits on x."""
    params = [p for p in shadow.parameters() if p.requires_grad]
    v_x, v_u = victim(x), victim(u)
    s_x, s_u = shadow(x), shadow(u)
    g_labels = torch.cat([g.flatten() for g in torch.autograd.grad(F.cross_entropy(s_x, y), params,
                                                                     retain_graph=True)]).detach()
    g_victim = torch.cat([g.flatten() for g in torch.autograd.grad(kl_to(s_x, v_x), params, create_graph=True)])
    g_ood = torch.cat([g.flatten() for g in torch.autograd.grad(kl_to(s_u, v_u), params, create_graph=True)])
    terms = {"ce": F.cross_entropy(v_x, y), "id_push": -distance(v_x, s_x.detach()),
             "ood": distance(v_u, s_u.detach()), "grad_cos": F.cosine_similarity(g_victim, g_labels, dim=0),
             "grad_ood": g_ood.abs().mean()}
    return terms, v_x


WEIGHTS = {"ce": None, "id_push": "ini_beta", "ood": "ini_gamma", "grad_cos": "ini_delta", "grad_ood": "ini_epsilon"}


def _ini(model: nn.Module, batch: Batch, ctx: Context):
    cfg = ctx.cfg
    terms, logits = ini_terms(model, ctx.shadow, batch.x, batch.y, batch.pair)
    weighted = [t * (getattr(cfg, WEIGHTS[k]) if WEIGHTS[k] else 1.0) for k, t in terms.items()
                if not WEIGHTS[k] or getattr(cfg, WEIGHTS[k]) != 0]
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.ini_pcgrad:
        # The random order of the projections comes from the batch itself, so a resumed run makes the same steps.
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + int(batch.index[:8].sum()))
        grads = pcgrad(weighted, params, g)
    else:
        grads = list(torch.autograd.grad(sum(weighted), params))
        torch.nn.utils.clip_grad_norm_(grads, max_norm=10.0)  # the authors' non-PCGrad path clips to 10
    for p, grad in zip(params, grads):  # only V's parameters: S is never stepped
        p.grad = grad
    total = sum(weighted).detach()
    return total, {k: v.detach() for k, v in terms.items()}, logits.detach()


register_teacher(Recipe("ini", "InI (Guo et al. 2023): isolate the thief's gradient (a frozen random clone's) from the "
                               "labels' and answer out-of-distribution queries uninformatively",
                        _ini, ("ood", "ini_gamma", "ini_delta", "ini_epsilon", "ini_beta", "ini_pcgrad"),
                        needs_ood=True, needs_shadow=True, manual_backward=True, single_process=True))
