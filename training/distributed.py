"""Data-parallel training over processes started by torchrun: one process per GPU (nccl) or per CPU slot (gloo).

Every function here is a no-op (or the identity) in a plain single process, so the training loop reads the same
either way. The contract that makes a distributed run equal a single-process one: every rank builds the same
global batch (same seed) and keeps its contiguous share of it (`shard`); BatchNorm statistics are taken over the
global batch (`sync_batchnorm`); each rank's loss is weighted by its share so DistributedDataParallel's gradient
average is the global batch's mean gradient.
"""
from __future__ import annotations

import copy
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def setup(device: str = "auto") -> torch.device:
    """Join the process group torchrun describes in the environment; returns this rank's device."""
    missing = [v for v in LAUNCH_VARIABLES if v not in os.environ]
    if missing:
        raise ValueError(f"--distributed needs the environment torchrun sets ({', '.join(missing)} missing): launch "
                         "with `torchrun --nproc_per_node N training/train_ast.py ... --distributed`")
    local = int(os.environ["LOCAL_RANK"])
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"with --distributed each process takes cuda:LOCAL_RANK or the CPU; use --device auto, cuda "
                         f"or cpu, not {device!r}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but this torch sees no CUDA GPU; use --device cpu")
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs: lower --nproc_per_node")
        torch.cuda.set_device(local)
        torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return dev


def teardown() -> None:
    if active():
        dist.destroy_process_group()


@contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. to fill a cache), the others after it."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


class PeerFailed(RuntimeError):
    """Rank 0 failed in a step it runs alone; the other ranks stop with this instead of waiting for it."""


def main_only(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` on rank 0 alone (writing files, exporting). Every rank then learns whether it worked,
    so a failure there stops the others with PeerFailed instead of leaving them waiting in their next collective.
    Returns fn's result on rank 0, None on the others."""
    if not active():
        return fn(*args, **kwargs)
    result, error = None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:  # re-raised below, once the others know
            error = e
    failure = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(failure, src=0)
    if error is not None:
        raise error
    if failure[0] is not None:
        raise PeerFailed(f"rank 0 failed ({failure[0]}); rank {rank()} stops too")
    return result


def share(n: int, rank: int, world: int) -> slice:
    """Rank's contiguous rows of n: the first n % world ranks get one more, like torch.tensor_split."""
    size, extra = divmod(n, world)
    start = rank * size + min(rank, extra)
    return slice(start, start + size + (rank < extra))


def shard(n: int) -> slice:
    """This process's share of n rows."""
    return share(n, rank(), world_size())


def _wire_device() -> torch.device:
    """Where a collective's tensors must be: nccl moves CUDA tensors only, gloo (here) CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_all(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `t` over all ranks, on t's device (a copy; `t` is left alone)."""
    if not active():
        return t.clone()
    wire = t.to(_wire_device(), copy=True)
    dist.all_reduce(wire)
    return wire.to(t.device)


def cat_ranks(local: torch.Tensor) -> torch.Tensor:
    """Every rank's `local` rows (their counts may differ), concatenated in rank order, on every rank, on
    local's device."""
    if not active():
        return local
    wire = _wire_device()
    counts = [torch.zeros((), dtype=torch.int64, device=wire) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor(len(local), device=wire))
    longest = max(int(c) for c in counts)
    padded = local.new_zeros((longest, *local.shape[1:]), device=wire)
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)  # all_gather needs equal shapes: pad, then trim
    return torch.cat([p[:int(c)] for p, c in zip(parts, counts)]).to(local.device)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum of the ranks' gradients (each rank's output feeds every loss)."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the global batch, for any backend (torch.nn.SyncBatchNorm
    runs on CUDA only). One differentiable all-reduce per layer carries each rank's (mean, M2, count); they are
    combined with Chan's parallel formula, which avoids the cancellation of E[x^2] - E[x]^2 in float32."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        c, w = self.num_features, world_size()
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        count = x.numel() // c
        mean = x.mean(dims) if count else x.new_zeros(c)
        m2 = ((x - mean.view(shape)) ** 2).sum(dims)
        local = torch.cat([mean, m2, x.new_full((1,), count)])
        # An all-gather built from an all-reduce: each rank fills its own row. Its gradient is an all-reduce too.
        rows = torch.zeros(w, 2 * c + 1, dtype=x.dtype, device=x.device).index_copy(
            0, torch.tensor([rank()], device=x.device), local[None])
        rows = _AllReduceSum.apply(rows)
        means, m2s, counts = rows[:, :c], rows[:, c:2 * c], rows[:, 2 * c:]
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        var = (m2s + counts * (means - mean) ** 2).sum(0) / total  # biased, as BatchNorm normalises with
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * total / (total - 1).clamp(min=1), factor)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm replaced by one sharing its parameters and buffers, so training the result
    trains `module`. Ours works on any device; on CUDA wrap() takes torch's (fused kernels) instead."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, device=module.running_mean.device
                            if module.running_mean is not None else None)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        return out
    for name, child in list(module.named_children()):
        module.add_module(name, sync_batchnorm(child))
    return module


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The module to train: `model` itself in one process, else a DDP over a sync-BatchNorm twin of it that
    shares its tensors, so `model` stays a plain module for evaluation, checkpoints and export."""
    if not active():
        return model
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    twin = copy.deepcopy(model, memo=shared)  # a new module tree over the same tensors
    twin = nn.SyncBatchNorm.convert_sync_batchnorm(twin) if device.type == "cuda" else sync_batchnorm(twin)
    # DDP's per-forward buffer broadcast is left on: the synced running statistics are equal on every rank
    # anyway, and the flag that turns it off changes name between torch releases.
    return nn.parallel.DistributedDataParallel(twin, device_ids=[device.index] if device.type == "cuda" else None)
