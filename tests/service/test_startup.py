"""A bad model or setting stops start-up with one clear line and a non-zero exit, before the port is bound."""
import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO


def start(*args):
    return subprocess.run([sys.executable, "-m", "service", *args, "--port", "1"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def model_copy(digits_run, tmp_path):
    for name in ("model.onnx", "model.json"):
        shutil.copy(digits_run[0] / name, tmp_path / name)
    return tmp_path / "model.onnx"


def assert_one_line_error(result, words):
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("astguard-serve: error:") and words in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_model_file_stops_start_up(tmp_path):
    assert_one_line_error(start("--model", str(tmp_path / "none.onnx")), "does not exist")


def test_a_missing_model_card_stops_start_up(model_copy):
    model_copy.with_suffix(".json").unlink()
    assert_one_line_error(start("--model", str(model_copy)), "no model card")


def test_a_card_whose_sha256_does_not_match_the_file_stops_start_up(model_copy):
    card = json.loads(model_copy.with_suffix(".json").read_text())
    card["sha256"] = "0" * 64
    model_copy.with_suffix(".json").write_text(json.dumps(card))
    assert_one_line_error(start("--model", str(model_copy)), "does not match its model card")


def test_an_onnx_file_onnxruntime_cannot_load_stops_start_up(model_copy):
    model_copy.write_bytes(b"not an onnx graph")
    card = json.loads(model_copy.with_suffix(".json").read_text())
    card["sha256"] = __import__("hashlib").sha256(b"not an onnx graph").hexdigest()
    model_copy.with_suffix(".json").write_text(json.dumps(card))
    assert_one_line_error(start("--model", str(model_copy)), "onnxruntime cannot load")


def test_a_broken_model_card_stops_start_up(model_copy):
    model_copy.with_suffix(".json").write_text("{}")
    assert_one_line_error(start("--model", str(model_copy)), "not valid")


@pytest.mark.parametrize("args,words", [
    (["--output-defense", "blur"], "unknown output defense 'blur'"),
    (["--max-wait-ms", "soon"], "max_wait_ms"),
    (["--device", "tpu"], "invalid choice"),
    (["--device", "cuda"], "CUDAExecutionProvider"),
])
def test_bad_settings_stop_start_up(model_copy, args, words):
    assert_one_line_error(start("--model", str(model_copy), *args), words)


def test_settings_come_from_the_environment_too(model_copy):
    r = subprocess.run([sys.executable, "-m", "service", "--model", str(model_copy), "--port", "1"], cwd=REPO,
                       capture_output=True, text=True, timeout=60,
                       env={**__import__("os").environ, "ASTGUARD_OUTPUT_DEFENSE": "nope"})
    assert_one_line_error(r, "unknown output defense 'nope'")


def test_the_serving_path_never_imports_torch_or_training(digits_run):
    code = ("import sys, service.cli, service.app, service.core, service.process; "
            "from service.config import Settings; from service.app import create_app; "
            f"create_app(Settings(model={str(digits_run[0] / 'model.onnx')!r}, budget_db='/tmp/astguard-t.sqlite')); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'training', 'torchvision')); "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_an_unusable_budget_database_stops_start_up(model_copy, tmp_path):
    assert_one_line_error(start("--model", str(model_copy), "--budget-db", str(tmp_path), "--budget-images", "5"),
                          "budget database")
