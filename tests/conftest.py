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

from contextlib import contextmanager  # noqa: E402

import httpx  # noqa: E402

from service.process import free_port, running  # noqa: E402,F401


class Server:
    def __init__(self, proc, url: str):
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
    """The real service (uvicorn on a free 127.0.0.1 port), ready; stopped afterwards."""
    with running(model, *args, env=env, timeout=timeout) as r:
        yield Server(r.proc, r.url)
