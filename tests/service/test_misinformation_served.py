"""Adaptive misinformation through the real service: two models, one batched call each, both reported, and every
mismatch a one-line start-up error."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest

from conftest import REPO, TINY, serve
from helpers import digits_test_images, files, png, reference_probabilities
from service.defenses import misinformation
from training.config import make_config
from training.train_ast import run


@pytest.fixture(scope="module")
def misinformation_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("mis") / "digits-misinformation"
    run(make_config("digits", **{**TINY, "teacher": "misinformation", "epochs": 2}), out, device="cpu", progress=False)
    return out / "model.onnx"


def test_unsure_answers_blend_toward_the_misinformation_model(digits_run, misinformation_model, tmp_path):
    model = digits_run[0] / "model.onnx"
    images = digits_test_images(12)
    with serve(model, "--output-defense", "misinformation", "--misinformation-model", str(misinformation_model),
               "--defense-tau", "0.99", "--budget-db", str(tmp_path / "b.sqlite")) as s:
        body = httpx.post(s.url + "/predict", files=files([png(i) for i in images])).json()
        info = httpx.get(s.url + "/v1/model").json()
    got = np.array([p["probabilities"] for p in body["predictions"]])
    f, g = reference_probabilities(model, images), reference_probabilities(misinformation_model, images)
    np.testing.assert_allclose(got, misinformation(f, nu=100.0, tau=0.99, misinformation=g), atol=1e-6)
    assert not np.allclose(got, f, atol=1e-3)  # some answers were unsure enough to blend
    assert [p["label"] for p in body["predictions"]] == f.argmax(1).tolist()  # the label is the model's own
    assert info["output_defense"]["params"] == {"nu": 100.0, "tau": 0.99}
    assert info["output_defense"]["models"]["misinformation"]["teacher"]["type"] == "misinformation"


def _start(*args):
    return subprocess.run([sys.executable, "-m", "service", *args, "--port", "1"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_a_missing_or_wrong_or_mismatched_misinformation_model_stops_start_up(digits_run, misinformation_model,
                                                                              tmp_path):
    model = str(digits_run[0] / "model.onnx")
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(misinformation_model, bad / "model.onnx")
    card = json.loads(misinformation_model.with_suffix(".json").read_text())
    card["class_names"] = card["class_names"][:9]
    card["outputs"] = [{**o, "shape": [-1, 9]} for o in card["outputs"]]
    (bad / "model.json").write_text(json.dumps(card))
    for args, words in [
        (["--output-defense", "misinformation"], "needs ASTGUARD_MISINFORMATION_MODEL"),
        (["--output-defense", "misinformation", "--misinformation-model", model], "was trained as 'ast'"),
        (["--output-defense", "misinformation", "--misinformation-model", str(bad / "model.onnx")],
         "does not fit the served model"),
    ]:
        r = _start("--model", model, *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and words in lines[0], r.stderr
