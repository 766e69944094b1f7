"""Shared fixtures: one tiny, real AST run on digits that several tests read."""
from __future__ import annotations

from pathlib import Path

import pytest

from training.config import make_config
from training.train_ast import run

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR_ZIP = REPO.parent / "shared" / "data" / "cifar10-jpeg.zip"

# Small but real: enough epochs for digits_cnn to learn, few PGD steps to keep the suite fast.
TINY = dict(dataset="digits", epochs=4, pgd_steps=5)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "digits-ast"
    summary = run(make_config("digits", **TINY), out, device="cpu", progress=False)
    return out, summary


# ---------------------------------------------------------------- a real server, as a subprocess

import os  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402

import httpx  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc, self.url = proc, url

    def metric(self, name: str, **labels) -> float:
        """The value of one Prometheus sample (0 if absent)."""
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line.startswith(name + ("{" + want + "}" if want else " ")):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


@contextmanager
def serve(model: Path, *args: str, env: dict | None = None, timeout: float = 60):
    """Start `python -m service` on a free loopback port, wait until ready, stop it afterwards."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service", "--model", str(model), "--host", "127.0.0.1",
                             "--port", str(port), *args], cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read()}")
            try:
                if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise RuntimeError("server did not become ready")
            time.sleep(0.1)
        yield Server(proc, url)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
