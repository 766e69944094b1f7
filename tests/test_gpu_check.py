"""benchmarks/gpu_check.py is safe where there is no GPU: it says so, exits 0 and writes nothing."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: run the check itself, not its CPU mode")
def test_without_a_gpu_the_check_says_so_and_exits_0(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "gpu")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "no CUDA GPU" in r.stdout
    assert not (tmp_path / "gpu").exists()
