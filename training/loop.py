"""The training loop: one screen, SGD, a checkpoint every epoch, a JSON-lines log, exact resume."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from training.config import Config, lr_at
from training.data import DeviceLoader, Split, iterate_in_order
from training.teachers import Context, Recipe


class RunError(ValueError):
    """A run directory that cannot be resumed or reused as asked."""


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, device, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x.to(device)).float().cpu() for x in iterate_in_order(images, batch_size)])


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device, batch_size: int = 512) -> float:
    return (predict_logits(model, images, device, batch_size).argmax(1) == labels).float().mean().item()


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


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
    cfg: Config = ctx.cfg
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = out_dir / "checkpoint.pt", out_dir / "log.jsonl"
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    start, history = 0, []
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, history = state["epoch"], state["history"]
    log_path.write_text("".join(json.dumps(row) + "\n" for row in history))

    loader = DeviceLoader(train.images.to(device), train.labels.to(device), cfg.batch_size,
                          pair=pair.to(device) if pair is not None else None,
                          target=target.to(device) if target is not None else None, crop_pad=cfg.crop_pad,
                          flip=cfg.flip, seed=cfg.seed)
    steps = len(loader)
    for epoch in range(start, epochs):
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)  # dropout draws: the same after a resume
        model.train()
        t0, sums, correct, skipped = time.time(), {}, torch.zeros((), device=device), 0
        bar = tqdm(loader.epoch(epoch), total=steps, desc=f"{recipe.name} {epoch + 1}/{epochs}",
                   unit="batch", leave=False, disable=not progress)
        for i, batch in enumerate(bar):
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, epoch + i / steps, epochs)
            loss, terms, logits = recipe.loss(model, batch, ctx)
            if recipe.nan_guard and not torch.isfinite(loss).item():
                skipped += 1
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # Running sums stay on the device: no sync per step.
            for k, v in {"loss": loss.detach(), **terms}.items():
                sums[k] = sums.get(k, 0.0) + v * len(batch.y)
            correct += (logits.argmax(1) == batch.y).sum()
        n = len(train.labels)
        row = {"epoch": epoch + 1, "lr": lr_at(cfg, epoch, epochs),
               **{k: float(v) / n for k, v in sums.items()},
               "train_accuracy": correct.item() / n, "test_accuracy": accuracy(model, test.images, test.labels, device,
                                                                                cfg.eval_batch_size),
               "skipped_steps": skipped, "seconds": round(time.time() - t0, 3)}
        history.append(row)
        with log_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        _save_atomic({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                      "history": history, "meta": meta, "recipe": recipe.name}, ckpt_path)
        if progress:
            tqdm.write(f"{recipe.name} epoch {epoch + 1}/{epochs}: loss {row['loss']:.4f} "
                       f"test acc {row['test_accuracy']:.4f} ({row['seconds']:.1f}s)")
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
    return history
