#!/usr/bin/env python
"""The first thing to run when a GPU is at hand: what the GPU path does, measured, in one script of a few minutes.

    python benchmarks/gpu_check.py [--data ../shared/data/cifar10-jpeg.zip] [--out docs/results/gpu] [--budget-s 420]

Steps, each timed and recorded even when another fails (a step that fails is written down with its error):
1. `cuda`: the device, torch's CUDA and bf16 support, onnxruntime's providers; then `cuda_tests`, the CUDA test
   subset (`pytest tests/cuda`: loader, PGD, AST/NT/InI steps in bf16, DDP over nccl, export, onnxruntime-gpu).
2. `train_bench`: teacher-training images/s on CUDA, fp32 against channels_last, bf16 autocast and both, and PGD
   images*steps/s (benchmarks/train_bench.py --device cuda, ResNet-18 on CIFAR-10 images).
3. `slice`: a timed slice of the paper-scale CIFAR-10 ResNet-18 pipeline (preset cifar10-resnet18, bf16 +
   channels_last): a few epochs of base, PGD-40 on the training set, a few epochs of AST; from its per-epoch and
   PGD seconds, the projected time of the full 160 + 160 epoch pipeline.
4. `serve`: the service's images/s on onnxruntime-gpu against raw onnxruntime-gpu (benchmarks/serve_bench.py),
   when onnxruntime offers CUDAExecutionProvider.
It writes `gpu_check.json` and `gpu_check.md` under --out. On a machine without a CUDA GPU it says so and exits 0,
writing nothing (tests/test_gpu_check.py runs it that way).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-jpeg.zip"
PAPER_EPOCHS = 160


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CIFAR-10 (JPEG zip, ImageFolder layout)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "gpu")
    p.add_argument("--budget-s", type=float, default=420, help="stop starting new steps after this many seconds")
    p.add_argument("--slice-epochs", type=int, default=2, help="epochs of base and of AST in the timed slice")
    return p.parse_args(argv)


def _run(cmd: list[str], timeout: float) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(10.0, timeout))
    out = {"command": " ".join(cmd), "returncode": r.returncode, "seconds": round(time.perf_counter() - t0, 1),
           "tail": (r.stdout + r.stderr)[-3000:]}
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[1] if len(cmd) > 1 else cmd[0]} exited {r.returncode}: {out['tail'][-600:]}")
    return out


def step_cuda(args, left) -> dict:
    import onnxruntime as ort
    import torch

    return {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
            "bf16": torch.cuda.is_bf16_supported(), "memory_gib": round(torch.cuda.get_device_properties(0)
                                                                       .total_memory / 2 ** 30, 1),
            "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
            "python": platform.python_version()}


def step_cuda_tests(args, left) -> dict:
    """The CUDA test subset (tests/cuda): loader, PGD, AST/NT/InI steps, DDP over nccl, export, onnxruntime-gpu."""
    out = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/cuda"], min(left, 180))
    out["summary"] = out["tail"].strip().splitlines()[-1] if out["tail"].strip() else ""
    return out


def step_train_bench(args, left) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = _run([sys.executable, "benchmarks/train_bench.py", "--device", "cuda", "--arch", "resnet18",
                    "--images", "16384", "--batch-size", "512", "--repeats", "3", "--workers", "0",
                    "--pgd-steps", "10", "--json", f"{d}/train.json",
                    *(["--data", str(args.data)] if args.data.exists() else [])], left)
        out["results"] = json.loads(Path(f"{d}/train.json").read_text())["summary"]
    return out


def step_slice(args, left) -> dict:
    if not args.data.exists():
        raise RuntimeError(f"no CIFAR-10 at {args.data} (--data)")
    d, e = args.work, args.slice_epochs
    out = _run([sys.executable, "-m", "training.train_ast", "--preset", "cifar10-resnet18", "--dataset", str(args.data),
                "--epochs", str(e), "--base-epochs", str(e), "--precision", "bf16", "--channels-last",
                "--device", "cuda", "--no-progress", "--out", f"{d}/ast"], left)
    base = [json.loads(line) for line in Path(f"{d}/ast/base/log.jsonl").read_text().splitlines()]
    ast = [json.loads(line) for line in Path(f"{d}/ast/log.jsonl").read_text().splitlines()]
    summary = json.loads(Path(f"{d}/ast/metrics.json").read_text())
    # The first epoch pays for cuDNN's autotuning and the caches: project from the later ones where there are any.
    per_epoch = {name: (sum(r["seconds"] for r in rows[1:]) / (len(rows) - 1)) if len(rows) > 1 else rows[0]["seconds"]
                 for name, rows in (("base", base), ("ast", ast))}
    pgd = summary.get("pgd", {}).get("seconds", 0.0)
    out.update(base_epoch_s=round(per_epoch["base"], 2), ast_epoch_s=round(per_epoch["ast"], 2), pgd_s=pgd,
               projected_full_pipeline_s=round(PAPER_EPOCHS * (per_epoch["base"] + per_epoch["ast"]) + pgd, 1),
               accuracy_after_slice={"base": base[-1]["test_accuracy"], "ast": ast[-1]["test_accuracy"]})
    return out


def step_serve(args, left) -> dict:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError("onnxruntime offers no CUDAExecutionProvider: install astguard[gpu] (onnxruntime-gpu)")
    model = args.work / "ast" / "model.onnx"  # the slice's AST teacher (ResNet-18), when the slice ran
    if not model.exists():
        raise RuntimeError("no model to serve: the slice step did not export one")
    return _run([sys.executable, "benchmarks/serve_bench.py", "--model", str(model), "--no-naive",
                 "--server-args", "--device cuda"], left)


STEPS = {"cuda": step_cuda, "cuda_tests": step_cuda_tests, "train_bench": step_train_bench, "slice": step_slice, "serve": step_serve}


def markdown(results: dict) -> str:
    lines = ["# GPU check", "", f"`python benchmarks/gpu_check.py`, {results['date']}, {results['wall_s']:.0f} s.", ""]
    for name, r in results["steps"].items():
        lines.append(f"## {name}")
        if "error" in r:
            lines.append(f"failed: {r['error']}")
        else:
            shown = {k: v for k, v in r.items() if k not in ("tail",)}
            lines += ["```json", json.dumps(shown, indent=1), "```"]
            if "tail" in r:
                lines += ["```", r["tail"][-1500:], "```"]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("gpu_check: torch is not installed; nothing to check (pip install -e '.[train]')")
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine; nothing to check (run it where a GPU is at hand)")
        return 0
    t0 = time.perf_counter()
    args.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "steps": {}}
    for name, step in STEPS.items():
        left = args.budget_s - (time.perf_counter() - t0)
        if left < 20:
            results["steps"][name] = {"error": f"not started: the {args.budget_s:.0f} s budget was spent"}
            continue
        print(f"gpu_check: {name} ...", flush=True)
        try:
            results["steps"][name] = step(args, left)
        except Exception as e:  # noqa: BLE001 - every step's failure is a result to record, not a reason to stop
            results["steps"][name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"gpu_check: {name}: {'failed' if 'error' in results['steps'][name] else 'done'}", flush=True)
    results["wall_s"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(results))
    print(f"gpu_check: wrote {args.out}/gpu_check.json and gpu_check.md ({results['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
