#!/usr/bin/env python
"""Throughput of astguard's training data path and PGD, each against the plain baseline it replaces.

(1) SGD training of one model fed by the device-resident `DeviceLoader` (crop_pad=4, flip) versus a
    torchvision pipeline (DataLoader over PIL images, RandomCrop(padding=4) + RandomHorizontalFlip + ToTensor)
    with num_workers=0 and num_workers=2; the same batches are also timed without the model (loader only).
(2) `pgd_linf` (input gradients only) versus the released AST code's PGD step, which called
    `model.zero_grad(); loss.backward()` and so computed every weight gradient as well.
(3) The training step in fp32 against channels_last, bf16 autocast, and both (training/loop.py's `--precision
    bf16` and `--channels-last`), as ratios against fp32.

Run from the repository root:
    python benchmarks/train_bench.py [--arch cnn5] [--images 4096] [--batch-size 128] [--device auto]
                                     [--data PATH_OR_NAME] [--pgd-steps 10] [--repeats 7] [--json PATH]
Every figure is the median over --repeats timed runs; the arms take turns so slow drift hits them alike.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs as a plain script, installed package or not

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms  # noqa: E402

from training.data import DeviceLoader, load_dataset, to_float  # noqa: E402
from training.models import create_model  # noqa: E402
from training.pgd import pgd_linf  # noqa: E402

CROP_PAD = 4
PGD_EPS, PGD_STEP = 0.3, 0.01
PGD_KEY = "pgd speed-up (pgd_linf / naive backward)"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="cnn5")
    p.add_argument("--images", type=int, default=4096, help="training images per timed epoch")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--data", default=None,
                   help="synthetic uint8 3x32x32 if omitted; else a load_dataset name (digits, a zip path ...)")
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per arm before timing")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per arm; the median is reported")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader num_workers variants")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--no-precision", action="store_true", help="skip (3), bf16 / channels_last against fp32")
    return p.parse_args(argv)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously: the clock means nothing until they have finished.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- data

def load_images(args) -> dict:
    """uint8 [N,C,H,W] images, labels and the facts the model needs, synthetic or from load_dataset."""
    if args.data is None:
        g = torch.Generator().manual_seed(args.seed)
        images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 10, (args.images,), generator=g)
        return dict(name="synthetic uint8 3x32x32", images=images, labels=labels, num_classes=10,
                    mean=None, std=None)
    ds = load_dataset(args.data, cache_dir=REPO / "runs" / ".cache" / "data")
    n = min(args.images, len(ds.train.labels))
    return dict(name=f"{ds.name} (first {n} train images)", images=ds.train.images[:n].contiguous(),
                labels=ds.train.labels[:n].contiguous(), num_classes=ds.num_classes, mean=ds.mean, std=ds.std)


class PILImages(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does: HWC uint8 arrays, a PIL image per item, then the transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        arr = images.permute(0, 2, 3, 1).numpy()
        self.images = np.ascontiguousarray(arr[..., 0] if arr.shape[-1] == 1 else arr)  # 'L' wants HW
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def torchvision_loader(images, labels, batch_size, workers, seed, device) -> torch.utils.data.DataLoader:
    size = images.shape[-1]
    tf = transforms.Compose([transforms.RandomCrop(size, padding=CROP_PAD), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor()])
    # persistent_workers: worker start-up is paid once in the warm-up, the baseline's best case.
    return torch.utils.data.DataLoader(
        PILImages(images, labels, tf), batch_size=batch_size, shuffle=True, num_workers=workers,
        drop_last=True, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed))


def make_arms(data: dict, args, device: torch.device) -> dict:
    """name -> fn(epoch) giving an iterator of (x float [0,1] on device, y on device)."""
    images, labels = data["images"], data["labels"]
    # Device-resident: the uint8 set is moved once, as training/loop.py does, outside the timed region.
    dev_loader = DeviceLoader(images.to(device), labels.to(device), args.batch_size, crop_pad=CROP_PAD,
                              flip=True, drop_last=True, seed=args.seed)
    arms = {"device_loader": lambda epoch: ((b.x, b.y) for b in dev_loader.epoch(epoch))}
    for w in args.workers:
        dl = torchvision_loader(images, labels, args.batch_size, w, args.seed, device)
        arms[f"dataloader_w{w}"] = lambda epoch, dl=dl: (
            (x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in dl)
    return arms


# ---------------------------------------------------------------- (1) training and loader-only timing

def reset(model: torch.nn.Module, init: dict, lr: float, seed: int) -> torch.optim.Optimizer:
    """Same weights, fresh optimizer state and the same dropout draws for every arm."""
    model.load_state_dict(init)
    model.train()
    torch.manual_seed(seed)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)


def sgd_step(model, opt, x, y) -> None:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def time_epoch(batches, device, step=None) -> tuple[float, int]:
    """Seconds for one full pass over `batches` (iterator creation included) and the number of batches."""
    sync(device)
    t0 = time.perf_counter()
    n = 0
    for x, y in batches:
        if step is not None:
            step(x, y)
        n += 1
    sync(device)
    return time.perf_counter() - t0, n


def bench_training(arms, model, init, args, device, steps) -> dict:
    train_s = {name: [] for name in arms}
    loader_s = {name: [] for name in arms}
    # Warm-up: allocator, thread pools, DataLoader workers, first-call dispatch.
    for name, batches in arms.items():
        opt = reset(model, init, args.lr, args.seed)
        for i, (x, y) in enumerate(batches(10_000)):
            sgd_step(model, opt, x, y)
            if i + 1 >= args.warmup:
                break
        time_epoch(batches(10_001), device)
    for r in range(args.repeats):
        for name, batches in arms.items():
            opt = reset(model, init, args.lr, args.seed)
            sec, n = time_epoch(batches(r), device, lambda x, y: sgd_step(model, opt, x, y))
            assert n == steps, f"{name} gave {n} batches, expected {steps}"
            train_s[name].append(sec)
        for name, batches in arms.items():
            sec, n = time_epoch(batches(r), device)
            assert n == steps
            loader_s[name].append(sec)
    images = steps * args.batch_size
    return {kind: {name: {"seconds": s, "images_per_s": images / statistics.median(s)} for name, s in d.items()}
            for kind, d in (("train", train_s), ("loader_only", loader_s))}


# ---------------------------------------------------------------- (3) precision and memory format

PRECISION_ARMS = {"fp32": (False, False), "channels_last": (False, True), "bf16": (True, False),
                  "bf16_channels_last": (True, True)}


def bench_precision(data, model, init, args, device, steps) -> dict:
    """The training loop's step (training/loop.py: `--precision bf16` autocast, `--channels-last`) against fp32, on
    the device-resident loader, the arms alternating round by round."""
    loader = DeviceLoader(data["images"].to(device), data["labels"].to(device), args.batch_size, crop_pad=CROP_PAD,
                          flip=True, drop_last=True, seed=args.seed)
    models = {}
    for name, (_, channels_last) in PRECISION_ARMS.items():
        m = copy.deepcopy(model)
        m.load_state_dict(init)
        models[name] = m.to(memory_format=torch.channels_last) if channels_last else m

    def stepper(name):
        bf16, channels_last = PRECISION_ARMS[name]
        m = models[name]
        opt = reset(m, init, args.lr, args.seed)

        def step(x, y):
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.float().backward()
            opt.step()
        return step

    for name in PRECISION_ARMS:  # warm-up
        step = stepper(name)
        for i, b in enumerate(loader.epoch(10_000)):
            step(b.x, b.y)
            if i + 1 >= args.warmup:
                break
    seconds = {name: [] for name in PRECISION_ARMS}
    for r in range(args.repeats):
        for name in PRECISION_ARMS:
            sec, n = time_epoch(((b.x, b.y) for b in loader.epoch(r)), device, stepper(name))
            assert n == steps
            seconds[name].append(sec)
    images = steps * args.batch_size
    return {name: {"seconds": s, "images_per_s": images / statistics.median(s)} for name, s in seconds.items()}


# ---------------------------------------------------------------- (2) PGD

def pgd_naive(model, x, y, *, eps: float, step: float, steps: int) -> torch.Tensor:
    """The released AST code's loop: grads flag on the images, mean CE, and a full backward into the weights."""
    x = x.detach()
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad = True
        loss = F.cross_entropy(model(x_adv), y)
        model.zero_grad()
        loss.backward()
        x_adv = x_adv.detach() + step * x_adv.grad.sign()
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0, 1)
    return x_adv.detach()


def bench_pgd(model, x, y, args, device) -> dict:
    model.eval()
    fns = {"pgd_linf": lambda s: pgd_linf(model, x, y, eps=PGD_EPS, step=PGD_STEP, steps=s),
           "naive_backward": lambda s: pgd_naive(model, x, y, eps=PGD_EPS, step=PGD_STEP, steps=s)}
    for fn in fns.values():
        fn(2)
    secs = {name: [] for name in fns}
    outs = {}
    for _ in range(args.repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            outs[name] = fn(args.pgd_steps)
            sync(device)
            secs[name].append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    # Sum vs mean loss only rescales the gradient, so the sign steps, and the images, should agree.
    agree = (outs["pgd_linf"] - outs["naive_backward"]).abs().le(1e-6).float().mean().item()
    work = len(x) * args.pgd_steps
    res = {name: {"seconds": s, "image_steps_per_s": work / statistics.median(s)} for name, s in secs.items()}
    res["pixel_agreement"] = agree
    return res


# ---------------------------------------------------------------- report

def cpu_clocks() -> tuple[float, float, float] | None:
    """(busy CPU-s of the whole machine, CPU-s of this process and its reaped children, wall s); Linux only."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    return busy, own, time.perf_counter()


def other_cpu_share(start) -> float | None:
    """Share of the machine's CPU time that other processes took while we ran: contention we cannot control."""
    end = cpu_clocks()
    if start is None or end is None:
        return None
    other = (end[0] - start[0]) - (end[1] - start[1])
    return max(0.0, other / ((end[2] - start[2]) * (os.cpu_count() or 1)))


def speedup(fast_s: list[float], slow_s: list[float]) -> dict:
    """Ratio of median times, and the range of the per-round ratios: the arms of one round ran back to back,
    so that range shows how much of the ratio is this machine's run-to-run noise."""
    rounds = [s / f for f, s in zip(fast_s, slow_s)]
    return {"ratio": statistics.median(slow_s) / statistics.median(fast_s),
            "round_min": min(rounds), "round_max": max(rounds)}


def fmt(r: dict) -> str:
    return f"{r['ratio']:.2f}x  (per-round {r['round_min']:.2f}-{r['round_max']:.2f}x)"


def summarise(results: dict, args) -> dict:
    summary = {}
    for kind, label in (("train", "train"), ("loader_only", "loader only")):
        dev = results[kind]["device_loader"]["seconds"]
        for w in args.workers:
            summary[f"loader speed-up ({label}, workers={w})"] = speedup(
                dev, results[kind][f"dataloader_w{w}"]["seconds"])
    pgd = results["pgd"]
    summary[PGD_KEY] = speedup(pgd["pgd_linf"]["seconds"], pgd["naive_backward"]["seconds"])
    if "precision" in results:
        fp32 = results["precision"]["fp32"]["seconds"]
        for name in list(PRECISION_ARMS)[1:]:
            summary[f"training step speed-up ({name} / fp32)"] = speedup(results["precision"][name]["seconds"], fp32)
    return summary


def report(results: dict, args) -> str:
    env, summary = results["env"], results["summary"]
    lines = [f"astguard train_bench  torch {env['torch']}  device {env['device']}  threads {env['threads']}  "
             f"cpus {env['cpus']}",
             f"model {args.arch}  data {results['data']}  batch {args.batch_size}  timed steps {results['steps']}"
             f"  repeats {args.repeats} (median)"]
    for kind, title, label in (("train", "(1a) SGD training throughput", "train"),
                               ("loader_only", "(1b) loader-only throughput", "loader only")):
        lines += ["", f"{title}, images/s"]
        for name, r in results[kind].items():
            runs = " ".join(f"{s:.2f}" for s in r["seconds"])
            lines.append(f"  {name:<16} {r['images_per_s']:>10.0f}   (runs s: {runs})")
        for w in args.workers:
            lines.append(f"  ratio device_loader / dataloader_w{w}: "
                         f"{fmt(summary[f'loader speed-up ({label}, workers={w})'])}")
    p = results["pgd"]
    lines += ["", f"(2) PGD throughput, images*steps/s (batch {args.batch_size}, {args.pgd_steps} steps, "
                  f"eps {PGD_EPS}, step {PGD_STEP}, eval mode)"]
    for name in ("pgd_linf", "naive_backward"):
        runs = " ".join(f"{s:.2f}" for s in p[name]["seconds"])
        lines.append(f"  {name:<16} {p[name]['image_steps_per_s']:>10.0f}   (runs s: {runs})")
    lines.append(f"  ratio pgd_linf / naive_backward: {fmt(summary[PGD_KEY])}")
    lines.append(f"  adversarial pixels identical between the two: {100 * p['pixel_agreement']:.2f}%")
    if "precision" in results:
        lines += ["", "(3) training steps by precision and memory format, images/s (device loader)"]
        for name, r in results["precision"].items():
            runs = " ".join(f"{s:.2f}" for s in r["seconds"])
            lines.append(f"  {name:<20} {r['images_per_s']:>10.0f}   (runs s: {runs})")
    lines += ["", "summary"]
    lines += [f"  {k}: {fmt(v)}" for k, v in summary.items()]
    lines.append(f"  wall time: {results['wall_s']:.1f} s")
    # Other processes on the same cores skew every figure; say so rather than hide it.
    share = env["other_cpu_share"]
    if share is not None:
        lines.append(f"  CPU time used by other processes during the run: {100 * share:.0f}% of the machine"
                     + ("  (WARNING: figures are unreliable)" if share > 0.1 else ""))
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    cpu_at_start = cpu_clocks()
    device = pick_device(args.device)
    data = load_images(args)
    steps = len(data["labels"]) // args.batch_size
    if steps < 1:
        raise SystemExit(f"--images {len(data['labels'])} is smaller than one batch of {args.batch_size}")
    c, h = data["images"].shape[1], data["images"].shape[2]
    torch.manual_seed(args.seed)
    model = create_model(args.arch, data["num_classes"], in_channels=c, image_size=h,
                         mean=data["mean"], std=data["std"]).to(device)
    init = {k: v.clone() for k, v in model.state_dict().items()}

    arms = make_arms(data, args, device)
    results = {"env": {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
                       "cpus": os.cpu_count(), "python": platform.python_version()},
               "args": vars(args), "data": data["name"], "steps": steps}
    results.update(bench_training(arms, model, init, args, device, steps))
    del arms  # shuts the DataLoader workers down, so their CPU time is counted as ours below
    gc.collect()

    model.load_state_dict(init)
    x = to_float(data["images"][:args.batch_size]).to(device)
    y = data["labels"][:args.batch_size].to(device)
    results["pgd"] = bench_pgd(model, x, y, args, device)

    if not args.no_precision:
        results["precision"] = bench_precision(data, model, init, args, device, steps)
    results["summary"] = summarise(results, args)
    results["wall_s"] = time.perf_counter() - t_start
    results["env"]["other_cpu_share"] = other_cpu_share(cpu_at_start)
    print(report(results, args))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
