"""Teacher recipes: a loss over a batch plus what it needs, registered in TEACHERS (`--teacher KEY`).

A new recipe is one loss function plus one `register_teacher(Recipe(...))`: it then appears in `astguard-train
--teacher`, its --help, the evaluation's default rows and the report.

A Recipe is what the training loop runs; students (training/distill.py) are Recipes too.

Stingy Teacher (ST) is not here: it is the base teacher with a top-k filter applied to its answers at
distillation or serving time, and needs no training.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from astguard.registry import Registry
from training.data import Batch
from training.losses import ast_loss, nasty_loss

if TYPE_CHECKING:  # config.validate looks recipes up here: a run-time import back would make a circle
    from training.config import Config


@dataclass
class Context:
    cfg: Config
    top_k: int
    base: nn.Module | None = None  # the frozen base model, in eval mode
    shadow: nn.Module | None = None  # InI's clone: randomly initialised, never trained, in eval mode


LossFn = Callable[[nn.Module, Batch, Context], tuple[Tensor, dict[str, Tensor], Tensor]]


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    loss: LossFn  # -> (loss, detached loss terms, the model's logits on batch.x)
    params: tuple[str, ...] = ()  # the Config fields the recipe reads: its hyperparameters
    needs_base: bool = False
    needs_adversarial: bool = False  # batch.pair: each image's own PGD example against the base
    needs_ood: bool = False  # batch.pair: an out-of-distribution image (Config.ood) for each training image
    needs_shadow: bool = False  # ctx.shadow: a frozen, randomly initialised clone of the architecture
    nan_guard: bool = False  # skip steps whose loss is not finite (costs a device sync per step)
    manual_backward: bool = False  # the loss sets the parameters' gradients itself (InI's PCGrad); the loop steps
    single_process: bool = False  # double backpropagation or an attack inside the step: no DDP
    row: bool = True  # an evaluation row of its own (the misinformation model only serves beside another)


TEACHERS: Registry[Recipe] = Registry("teacher recipe")


def register_teacher(recipe: Recipe) -> Recipe:
    return TEACHERS.register(recipe.name, recipe, summary=recipe.summary, params=recipe.params)


def _base(model, batch, ctx):
    logits = model(batch.x)
    ce = F.cross_entropy(logits, batch.y)
    return ce, {"ce": ce.detach()}, logits


def _sparse_target_loss(model, batch, ctx, target):
    cfg = ctx.cfg
    logits = model(batch.x)
    loss, terms = ast_loss(logits, target, batch.y, alpha=cfg.alpha, temperature=cfg.temperature,
                           top_k=ctx.top_k, divergence=cfg.divergence)
    return loss, terms, logits


def _ast(model, batch, ctx):
    # The target is the model's own answer on the *paired* adversarial image, in eval mode and without gradient,
    # computed before the training forward so no graph is alive during it.
    model.eval()
    with torch.no_grad():
        target = model(batch.pair)
    model.train()
    return _sparse_target_loss(model, batch, ctx, target)


def _stt(model, batch, ctx):
    with torch.no_grad():
        target = ctx.base(batch.x)
    return _sparse_target_loss(model, batch, ctx, target)


def _nt(model, batch, ctx):
    with torch.no_grad():
        base_logits = ctx.base(batch.x)
    logits = model(batch.x)
    loss, terms = nasty_loss(logits, base_logits, batch.y, weight=ctx.cfg.nt_weight,
                             temperature=ctx.cfg.nt_temperature, direction=ctx.cfg.nt_direction)
    return loss, terms, logits


SPARSE = ("alpha", "temperature", "top_k", "divergence")
PGD = ("pgd_eps", "pgd_step", "pgd_steps", "pgd_random_start")

register_teacher(Recipe("base", "cross-entropy: the undefended teacher", _base))
register_teacher(Recipe("ast", "Adversarial Sparse Teacher: `a*T^2 * D(softmax(f(x)/T), softmax(sparse_k(f(x_adv))/T)) "
                               "+ (1-a)*CE(f(x), y)`, with x_adv the image's own PGD example", _ast, SPARSE + PGD,
                        needs_base=True, needs_adversarial=True))
register_teacher(Recipe("nt", "Nasty Teacher: `CE(f(x), y) - w*T^2*KL(softmax(f(x)/T) || softmax(base(x)/T))` (the "
                              "authors' code; --nt-direction reverse swaps the KL); steps with a non-finite loss are "
                              "skipped and counted", _nt, ("nt_weight", "nt_temperature", "nt_direction"),
                        needs_base=True, nan_guard=True))
register_teacher(Recipe("stt", "Stingy-Trained Teacher: AST's loss, with the base model's sparse answer on the clean "
                               "image as the target", _stt, SPARSE, needs_base=True))


# Recipes that need a module of their own register themselves there (as training.models does).
from training import ini, ltd, misinformation  # noqa: E402,F401
