"""A schema-driven fuzz run over /openapi.json (schemathesis, every check it has), against the real server with
and without API keys: no 5xx, every answer as the document says, and the document itself valid."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import serve

CONFIG = Path(__file__).with_name("schemathesis.toml")


def _fuzz(url: str, *headers: str, examples: int = 15) -> subprocess.CompletedProcess:
    st = shutil.which("st") or shutil.which("schemathesis")
    args = [st, "--config-file", str(CONFIG), "run", url + "/openapi.json", "--checks", "all",
            "--max-examples", str(examples), "--seed", "1", "--no-color"]
    for h in headers:
        args += ["-H", h]
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def st():
    if not (shutil.which("st") or shutil.which("schemathesis")):
        pytest.skip("schemathesis is a dev dependency (pip install -e '.[dev]')")


@pytest.mark.parametrize("keys", [False, True], ids=["open", "with-keys"])
def test_the_openapi_document_holds_under_a_schema_driven_fuzzer(digits_run, st, keys):
    args = ("--api-keys", "k", "--admin-keys", "root", "--detector", "knn", "--detector-threshold", "0") if keys \
        else ()
    with serve(digits_run[0] / "model.onnx", *args) as s:
        run = _fuzz(s.url, *(["Authorization: Bearer root"] if keys else []))
    summary = run.stdout[run.stdout.rfind("SUMMARY"):]
    assert run.returncode == 0, run.stdout[-6000:]
    assert "Tested: 15" in summary, summary  # every operation
    generated = int(re.search(r"(\d+) generated", summary).group(1))
    assert generated >= 300 and "failed" not in summary.split("generated")[1].split("\n")[0], summary
