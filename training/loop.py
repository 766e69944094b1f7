"""The training loop: one screen, SGD, a checkpoint every epoch, a JSON-lines log, exact resume."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from training import distributed
from training.config import Config, lr_at
from training.data import Batch, DeviceLoader, Split, iterate_in_order
from training.files import save_atomic
from training.teachers import Context, Recipe


class RunError(ValueError):
    """A run directory that cannot be resumed or reused as asked."""


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, device, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x.to(device)).float().cpu() for x in iterate_in_order(images, batch_size)])


def _record(m: Member, epoch: int, epochs: int, row: dict, progress: bool) -> None:
    """An epoch's log line, checkpoint and callback (rank 0's job in a distributed run)."""
    with (m.out_dir / "log.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    save_atomic({"epoch": epoch + 1, "model": m.model.state_dict(), "optimizer": m.opt.state_dict(),
                 "history": m.history, "meta": m.meta, "recipe": m.recipe.name}, m.out_dir / "checkpoint.pt")
    if progress:
        tqdm.write(f"{m.recipe.name} epoch {epoch + 1}/{epochs}: loss {row['loss']:.4f} "
                   + (f"test acc {row['test_accuracy']:.4f} " if row["test_accuracy"] is not None else "")
                   + f"({row['seconds']:.1f}s)")
    if m.on_epoch_end is not None:
        m.on_epoch_end(epoch, row)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device, batch_size: int = 512, *,
             sharded: bool = False) -> float:
    """Top-1 accuracy. `sharded`: every process of a distributed run scores its share and the counts are summed
    (all of them must call it)."""
    rows = distributed.shard(len(labels)) if sharded else slice(None)
    x, y = images[rows], labels[rows]  # a rank's share may be empty (fewer test images than ranks)
    hits = (predict_logits(model, x, device, batch_size).argmax(1) == y).sum() if len(y) else torch.tensor(0)
    return distributed.sum_all(hits).item() / len(labels) if sharded else hits.item() / len(labels)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but this torch sees no CUDA GPU; use --device cpu")
        torch.backends.cudnn.benchmark = True
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


@dataclass
class Member:
    """One model trained by fit_group: its recipe, its run directory, and what its checkpoint records."""
    model: nn.Module
    recipe: Recipe
    ctx: Context
    out_dir: Path
    meta: dict | None = None
    on_epoch_end: Callable[[int, dict], None] | None = None
    # fit_group's working state: the result (history), where it resumed, and per-epoch accumulators
    history: list[dict] = field(default_factory=list)
    start: int = 0
    net: nn.Module | None = field(default=None, repr=False)  # what the steps run: the model, or its DDP wrapper
    opt: torch.optim.Optimizer | None = field(default=None, repr=False)
    rng: tuple | None = field(default=None, repr=False)
    sums: dict = field(default_factory=dict, repr=False)
    correct: torch.Tensor | None = field(default=None, repr=False)
    skipped: int = 0


def fit(model: nn.Module, recipe: Recipe, ctx: Context, train: Split, test: Split, out_dir: Path, *,
        epochs: int, device: torch.device, pair: torch.Tensor | None = None,
        target: torch.Tensor | None = None, resume: bool = False,
        progress: bool = True, meta: dict | None = None,
        on_epoch_end: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Train `model` in place with `recipe` for `epochs`; returns the per-epoch history.

    Everything random depends on (seed, epoch), so a run resumed from its checkpoint ends with the same
    weights as one that was never interrupted. `meta` is stored in the checkpoint (the run's settings).
    `pair` and `target` travel with each training image into `Batch.pair` / `Batch.target` (see DeviceLoader).
    """
    member = Member(model, recipe, ctx, out_dir, meta, on_epoch_end)
    fit_group([member], train, test, epochs=epochs, device=device, pair=pair, target=target, resume=resume,
              progress=progress)
    return member.history


def _rng_state(device: torch.device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def fit_group(members: list[Member], train: Split, test: Split, *, epochs: int, device: torch.device,
              pair: torch.Tensor | None = None, target: torch.Tensor | None = None, resume: bool = False,
              progress: bool = True, prepare: Callable[[Batch], Batch] | None = None) -> None:
    """Train several models in lockstep on the same batches; `prepare(batch)` runs once per batch for all of
    them (e.g. a teacher's forward pass into batch.target). Each member ends exactly as if trained alone by
    fit(): it gets its own optimizer, checkpoint, log, and random stream (dropout), reset from (seed, epoch).
    The members must agree on what the batches depend on (batch size, augmentation, seed).

    Under torchrun (training.distributed) every rank trains its share of each global batch with DDP and the
    result equals a single process's with the same batch size; rank 0 alone writes logs and checkpoints."""
    cfg: Config = members[0].ctx.cfg
    loader_keys = ("batch_size", "crop_pad", "flip", "seed", "precision")
    if any(getattr(m.ctx.cfg, k) != getattr(cfg, k) for m in members for k in loader_keys):
        raise ValueError(f"fit_group members must share {', '.join(loader_keys)}")
    rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    n, bs = len(train.labels), cfg.batch_size
    if world > 1 and min(bs, n % bs or bs) < world:
        raise ValueError(f"{world} processes need at least {world} images in every batch, but a batch holds "
                         f"{min(bs, n % bs or bs)} ({n} images in batches of {bs}); change --batch-size or the "
                         "training set size")
    for m in members:
        if main:
            m.out_dir.mkdir(parents=True, exist_ok=True)
        m.opt = torch.optim.SGD(m.model.parameters(), lr=m.ctx.cfg.lr, momentum=m.ctx.cfg.momentum,
                                weight_decay=m.ctx.cfg.weight_decay)
        m.start, m.history = 0, []
        ckpt_path = m.out_dir / "checkpoint.pt"
        if resume and ckpt_path.exists():
            state = torch.load(ckpt_path, map_location=device, weights_only=False)
            m.model.load_state_dict(state["model"])
            m.opt.load_state_dict(state["optimizer"])
            m.start, m.history = state["epoch"], state["history"]
        if main:
            (m.out_dir / "log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in m.history))
        if m.ctx.cfg.channels_last:
            m.model.to(memory_format=torch.channels_last)
        m.net = distributed.wrap(m.model, device)

    loader = DeviceLoader(train.images.to(device), train.labels.to(device), cfg.batch_size,
                          pair=pair.to(device) if pair is not None else None,
                          target=target.to(device) if target is not None else None, crop_pad=cfg.crop_pad,
                          flip=cfg.flip, seed=cfg.seed, shard=(rank, world))
    steps = len(loader)
    progress = progress and main
    # bf16 autocast: the forward passes and the losses in bfloat16 where torch's autocast policy allows (softmax,
    # log_softmax and losses stay float32); the weights, gradients and optimizer stay float32.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    swap = len(members) > 1  # a lone model keeps the global random stream; a group swaps one per member
    names = "+".join(m.recipe.name for m in members)
    for epoch in range(min((m.start for m in members), default=epochs), epochs):
        active = [m for m in members if m.start <= epoch]  # a member resumed further along sits this epoch out
        for m in active:
            # Dropout draws: the same after a resume, and each rank's its own.
            torch.manual_seed((m.ctx.cfg.seed * 1_000_003 + epoch) * world + rank)
            m.rng = _rng_state(device) if swap else None
            m.net.train()
            m.sums, m.correct, m.skipped = {}, torch.zeros((), device=device), 0
        t0 = time.time()
        bar = tqdm(loader.epoch(epoch), total=steps, desc=f"{names} {epoch + 1}/{epochs}",
                   unit="batch", leave=False, disable=not progress)
        for i, batch in enumerate(bar):
            if prepare is not None:
                batch = prepare(batch)
            # DDP averages the ranks' gradients: weighting each rank's mean loss by its share of the global batch
            # makes that average the global batch's mean gradient, as in one process.
            share = len(batch.y) * world / min(bs, n - i * bs)
            for m in active:
                if swap:
                    _set_rng_state(m.rng, device)
                for group in m.opt.param_groups:
                    group["lr"] = lr_at(m.ctx.cfg, epoch + i / steps, epochs)
                with autocast:
                    loss, terms, logits = m.recipe.loss(m.net, batch, m.ctx)
                loss, terms, logits = loss.float(), {k: v.float() if torch.is_tensor(v) else v
                                                     for k, v in terms.items()}, logits.float()
                if swap:
                    m.rng = _rng_state(device)
                # Every rank must take or skip the step together, or DDP waits forever.
                if m.recipe.nan_guard and distributed.sum_all(~torch.isfinite(loss)).item():
                    m.skipped += 1
                    continue
                if not m.recipe.manual_backward:  # a manual recipe has set every parameter's gradient
                    m.opt.zero_grad(set_to_none=True)
                    (loss * share if world > 1 else loss).backward()
                m.opt.step()
                # Running sums stay on the device: no sync per step.
                for k, v in {"loss": loss.detach(), **terms}.items():
                    m.sums[k] = m.sums.get(k, 0.0) + v * len(batch.y)
                m.correct += (logits.argmax(1) == batch.y).sum()
        seconds = round((time.time() - t0) / len(active), 3)  # a group's epoch time, shared out
        for m in active:
            totals = distributed.sum_all(torch.stack([torch.as_tensor(v, device=device, dtype=torch.float64)
                                                      for v in [m.correct, *m.sums.values()]]))
            every = m.ctx.cfg.test_every
            scored = epoch + 1 == epochs or (every > 0 and (epoch + 1) % every == 0)
            row = {"epoch": epoch + 1, "lr": lr_at(m.ctx.cfg, epoch, epochs),
                   **{k: float(v) / n for k, v in zip(m.sums, totals[1:])},
                   "train_accuracy": float(totals[0]) / n,
                   # None on the epochs --test-every skips (the last is always scored)
                   "test_accuracy": accuracy(m.model, test.images, test.labels, device, m.ctx.cfg.eval_batch_size,
                                             sharded=True) if scored else None,
                   "skipped_steps": m.skipped, "seconds": seconds}
            m.history.append(row)
            distributed.main_only(_record, m, epoch, epochs, row, progress)
