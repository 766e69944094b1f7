"""L-inf PGD in [0,1] pixel space (Madry et al.), and the cached adversarial copy of a training set.

Normalisation lives inside the model, so eps is measured in pixels and the clamp to [0,1] is the real image
range (the released AST code clamped normalised tensors to [0,1], which is not).
"""
from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from training import distributed
from training.data import to_float
from training.files import run_lock, save_atomic


@dataclass(frozen=True)
class PGDConfig:
    eps: float = 0.3  # the paper's values
    step: float = 0.01
    steps: int = 40
    random_start: bool = False
    seed: int = 0


def pgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step: float, steps: int,
             random_start: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Untargeted PGD maximising CE(model(x'), y) over ||x' - x||_inf <= eps, x' in [0,1]. `model` in eval mode."""
    x = x.detach()
    x_adv = x.clone()
    if random_start:
        noise = torch.rand(x.shape, generator=generator).to(x.device, x.dtype)
        x_adv = (x_adv + (2 * noise - 1) * eps).clamp_(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        # Sum, not mean: the sign step ignores the scale, and a sum keeps each image's gradient its own.
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        # Gradients w.r.t. the input only: no weight gradients are computed or accumulated.
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step * grad.sign()
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0, 1)
    return x_adv.detach()


def state_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def adversarial_set(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: PGDConfig, *,
                    cache_dir: str | Path | None, batch_size: int = 256, device: torch.device | str = "cpu",
                    progress: bool = True, precision: str = "fp32") -> torch.Tensor:
    """PGD images for every training image, in the same order, as float16 [0,1] on the CPU.

    Cached on disk keyed by the model's weights, the images and the PGD settings. float16 keeps 11 bits in
    [0,1], finer than the 8 bits of the source pixels, at half the memory of float32. `precision` bf16 runs the
    model's forward and backward passes under bf16 autocast (the sign step only needs the gradient's sign); the
    images stay float32 and the set is cached apart from an fp32 one. In a distributed run
    (training.distributed) each rank attacks its share of the batches, every rank gets the whole set, and rank 0
    writes the cache; the batches, and so the images, are the ones a single process makes.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    key = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode())
    if precision != "fp32":  # fp32 sets keep the keys they were cached under
        key.update(precision.encode())
    key.update(state_hash(model).encode())
    key.update(hashlib.sha256(images.numpy().tobytes()).digest())
    key.update(hashlib.sha256(labels.numpy().tobytes()).digest())
    path = Path(cache_dir) / f"adv-{key.hexdigest()[:20]}.pt" if cache_dir else None
    # One process makes a set; another that needs it meanwhile waits, then reads it.
    with run_lock(path.with_suffix(".lock")) if path is not None else nullcontext():
        # Every rank must agree, or those that read the cache leave the others alone in the attack's collectives.
        if path is not None and distributed.sum_all(torch.tensor(int(path.exists()))) == distributed.world_size():
            return torch.load(path)
        adv = _attack_all(model, images, labels, cfg, batch_size, device, progress, precision)
        if path is not None:
            distributed.main_only(save_atomic, adv, path)
    return adv


def _attack_all(model, images, labels, cfg: PGDConfig, batch_size: int, device, progress: bool,
                precision: str = "fp32") -> torch.Tensor:
    model.eval()
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")
    g = torch.Generator().manual_seed(cfg.seed)
    starts = range(0, len(images), batch_size)
    mine = starts[distributed.shard(len(starts))]  # whole batches, so each is the one a single process attacks
    out = []
    for i in tqdm(starts, desc="PGD", unit="batch", disable=not (progress and distributed.is_main())):
        if i not in mine:
            if cfg.random_start:  # keep the generator where a single process would have it
                torch.rand(images[i:i + batch_size].shape, generator=g)
            continue
        x, y = to_float(images[i:i + batch_size]).to(device), labels[i:i + batch_size].to(device)
        with autocast:  # the model's passes only: the step itself and the set stay float32 / float16
            x_adv = pgd_linf(model, x, y, eps=cfg.eps, step=cfg.step, steps=cfg.steps,
                             random_start=cfg.random_start, generator=g)
        out.append(x_adv.half().cpu())  # the set waits on the CPU
    adv = torch.cat(out) if out else torch.zeros((0, *images.shape[1:]), dtype=torch.float16)
    return distributed.cat_ranks(adv)
