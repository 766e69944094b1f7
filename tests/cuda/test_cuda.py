"""The CUDA path, for a lent GPU (`benchmarks/gpu_check.py` runs this file first): the device loader, PGD, the AST,
NT and InI steps under bf16 + channels_last, DDP over nccl in one process, export, and onnxruntime-gpu serving.
Each test compares the GPU's result with the CPU's where the two must agree. Skipped where torch sees no CUDA GPU:
they cannot run, so they do not pretend to pass."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by gpu_check.py)")


def test_the_device_loader_keeps_the_set_on_the_gpu_and_batches_like_the_cpu():
    from training.data import DeviceLoader
    images = torch.randint(0, 256, (300, 3, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 10, (300,))
    cpu = DeviceLoader(images, labels, 64, crop_pad=1, flip=True, seed=3)
    gpu = DeviceLoader(images.cuda(), labels.cuda(), 64, crop_pad=1, flip=True, seed=3)
    for a, b in zip(cpu.epoch(1), gpu.epoch(1), strict=True):
        assert b.x.is_cuda and torch.equal(a.y, b.y.cpu())
        assert torch.allclose(a.x, b.x.cpu())


def test_pgd_on_the_gpu_stays_in_the_ball_and_fools_the_model():
    from training.pgd import pgd_linf
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 10)).cuda().eval()
    x = torch.rand(128, 3, 8, 8, device="cuda")
    y = model(x).argmax(1)
    for precision in ("fp32", "bf16"):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            adv = pgd_linf(model, x, y, eps=0.1, step=0.02, steps=10)
        assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        assert (model(adv).argmax(1) != y).float().mean() > 0.5, precision


@pytest.mark.parametrize("teacher", ["ast", "nt", "ini"])
def test_a_teacher_trains_on_the_gpu_in_bf16_and_channels_last(tmp_path, teacher):
    from training.config import make_config
    from training.train_ast import run
    cfg = make_config("digits", teacher=teacher, epochs=3, pgd_steps=3, precision="bf16", channels_last=True,
                      ood="noise")
    summary = run(cfg, tmp_path / teacher, device="cuda", progress=False)
    assert summary["test_accuracy"] > 0.7, summary
    assert summary["verification"]  # exported and checked against onnxruntime


def test_ddp_over_nccl_in_one_process_trains(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(REPO / "training" / "train_ast.py"), "--dataset", "digits", "--epochs", "2", "--pgd-steps", "2",
           "--no-progress", "--distributed", "--device", "cuda", "--out", str(tmp_path / "ddp")]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["test_accuracy"] > 0.5


def test_onnxruntime_gpu_serves_what_the_cpu_serves(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime offers no CUDAExecutionProvider: install astguard[gpu] (onnxruntime-gpu)")
    from service.runtime import OnnxModel
    from training.config import make_config
    from training.train_ast import run
    run(make_config("digits", teacher="base", epochs=2), tmp_path / "m", device="cuda", progress=False)
    x = np.random.default_rng(0).random((16, 1, 8, 8), dtype=np.float32)
    cpu = OnnxModel(tmp_path / "m" / "base" / "model.onnx", device="cpu").predict(x)[0]
    gpu = OnnxModel(tmp_path / "m" / "base" / "model.onnx", device="cuda").predict(x)[0]
    assert np.allclose(cpu, gpu, atol=1e-4)
