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
