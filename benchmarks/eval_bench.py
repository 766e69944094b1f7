"""Evaluation throughput: K students sharing one teacher forward (training.loop.fit_group) versus K separate
runs that each compute the teacher's answers themselves; a whole evaluation with `--jobs N` versus one
process; and, on a GPU, teacher training images/s with bf16 autocast and channels_last versus fp32.

    python benchmarks/eval_bench.py                  # CPU-sized: ResNet-20 teacher, 4 cnn5 students
    python benchmarks/eval_bench.py --students 8 --images 8192 --device cuda
    python benchmarks/eval_bench.py --skip-sharing --jobs 2   # only the --jobs comparison

Prints ratios; nothing here is a pass/fail test.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from training.config import make_config  # noqa: E402
from training.data import Split  # noqa: E402
from training.distill import kd_recipe  # noqa: E402
from training.loop import Member, fit, fit_group, resolve_device  # noqa: E402
from training.models import create_model  # noqa: E402
from training.teachers import Context, Recipe  # noqa: E402

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def synthetic(n: int, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                 torch.randint(0, 10, (n,), generator=g))


def sharing(args, device) -> None:
    train, test = synthetic(args.images), synthetic(256, 1)
    cfg = make_config("cifar10-resnet18", arch=args.student, epochs=args.epochs, batch_size=128,
                      eval_batch_size=256)
    torch.manual_seed(0)
    teacher = create_model(args.teacher, 10, 3, 32, MEAN, STD).to(device).eval()
    recipe = kd_recipe(4.0, 0.9)

    @torch.no_grad()
    def prepare(batch):
        return batch._replace(target=teacher(batch.x).float())

    def students():
        torch.manual_seed(1)
        return [create_model(args.student, 10, 3, 32, MEAN, STD).to(device) for _ in range(args.students)]

    def own_teacher(model, batch, ctx):  # a separate run computes the teacher's answers itself
        return recipe.loss(model, prepare(batch), ctx)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    solo = Recipe("kd", "kd", own_teacher)

    def run_shared(tmp):
        fit_group([Member(m, recipe, Context(cfg, 0), Path(tmp) / f"g{i}") for i, m in enumerate(students())],
                  train, test, epochs=args.epochs, device=device, prepare=prepare, progress=False)

    def run_separate(tmp):
        for i, m in enumerate(students()):
            fit(m, solo, Context(cfg, 0), train, test, Path(tmp) / f"s{i}", epochs=args.epochs, device=device,
                progress=False)

    def timed(fn):
        with tempfile.TemporaryDirectory() as tmp:
            sync()
            t0 = time.perf_counter()
            fn(tmp)
            sync()
            return time.perf_counter() - t0

    timed(run_separate)  # warm-up: allocator, kernels
    rounds = {"shared": [], "separate": []}
    for r in range(args.rounds):  # alternate the order, so neither always runs on a warmer machine
        order = [("shared", run_shared), ("separate", run_separate)]
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            rounds[name].append(timed(fn))
    shared, separate = (sorted(v)[len(v) // 2] for v in (rounds["shared"], rounds["separate"]))
    ratios = [b / a for a, b in zip(rounds["shared"], rounds["separate"])]
    per_hour = lambda s: args.students * 3600 / s  # noqa: E731
    print(f"{args.students} {args.student} students of one {args.teacher} teacher, {args.images} images x "
          f"{args.epochs} epochs on {device}:")
    print(f"  shared teacher forward: {shared:7.1f} s  ({per_hour(shared):8.1f} students/hour)")
    print(f"  separate runs:          {separate:7.1f} s  ({per_hour(separate):8.1f} students/hour)")
    print(f"  ratio shared/separate students per hour: {separate / shared:.2f}x (median of {args.rounds} rounds; "
          f"rounds {min(ratios):.2f}-{max(ratios):.2f}x)")


def jobs(args, device) -> None:
    """The digits evaluation (5 teachers, 2 student seeds sharing them) in one process, then in --jobs N, each
    from an empty work directory, as a user would run it."""
    def timed(n: int) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "evaluation", "--dataset", "digits", "--scale", "smoke", "--seeds",
                   "2", "--teacher-seed", "0", "--set", "epochs=8", "--student-epochs", "4", "--no-progress",
                   "--attacks", "soft", "--device", str(device), "--jobs", str(n), "--out", f"{tmp}/r",
                   "--work-dir", f"{tmp}/w"]  # the figure in the README predates the attack suite
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, cwd=Path(__file__).resolve().parents[1])
            return time.perf_counter() - t0

    rounds = {1: [], args.jobs: []}
    for r in range(args.rounds):
        for n in ([1, args.jobs] if r % 2 == 0 else [args.jobs, 1]):
            rounds[n].append(timed(n))
    one, many = (sorted(v)[len(v) // 2] for v in rounds.values())
    ratios = [a / b for a, b in zip(rounds[1], rounds[args.jobs])]
    print(f"digits evaluation (smoke scale, 8 teacher epochs, 2 seeds) on {device}, {torch.get_num_threads()} "
          f"threads:")
    print(f"  --jobs 1: {one:6.1f} s   --jobs {args.jobs}: {many:6.1f} s   ratio {one / many:.2f}x "
          f"(median of {args.rounds} rounds; rounds {min(ratios):.2f}-{max(ratios):.2f}x)")


def precision(args, device) -> None:
    if device.type != "cuda":
        print("bf16 autocast / channels_last: skipped (needs a CUDA device; run with --device cuda)")
        return
    x = torch.rand(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    results = {}
    for name, bf16, channels_last in (("fp32", False, False), ("fp32 channels_last", False, True),
                                      ("bf16 autocast", True, False), ("bf16 + channels_last", True, True)):
        torch.manual_seed(0)
        model = create_model(args.teacher_gpu, 10, 3, 32, MEAN, STD).to(device)
        xs = x
        if channels_last:
            model, xs = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for step in range(args.steps + 5):
            if step == 5:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(xs), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        torch.cuda.synchronize()
        results[name] = args.steps * args.batch / (time.perf_counter() - t0)
    print(f"{args.teacher_gpu} training, batch {args.batch}, {torch.cuda.get_device_name(device)}:")
    for name, ips in results.items():
        print(f"  {name:22s} {ips:9.0f} images/s  ({ips / results['fp32']:.2f}x fp32)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--students", type=int, default=4, help="K")
    p.add_argument("--student", default="cnn5")
    p.add_argument("--teacher", default="resnet20")
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--teacher-gpu", default="resnet18", help="architecture of the precision benchmark")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-sharing", action="store_true")
    p.add_argument("--jobs", type=int, default=0, help="also time a whole evaluation with --jobs N against 1")
    args = p.parse_args()
    device = resolve_device(args.device)
    if not args.skip_sharing:
        sharing(args, device)
    if args.jobs > 1:
        jobs(args, device)
    precision(args, device)


if __name__ == "__main__":
    main()
