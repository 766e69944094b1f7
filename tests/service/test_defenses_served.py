"""Each output defense, configured on a real server, changes the probabilities as defined and keeps the label."""
import httpx
import numpy as np
import pytest

from conftest import serve
from helpers import digits_test_images, files, png, reference_probabilities

CASES = {
    "none": [], "topk": ["--defense-k", "2"], "round": ["--defense-decimals", "2"],
    "reverse_sigmoid": ["--defense-beta", "0.3", "--defense-gamma", "0.5"], "label_only": [],
    "dcp": ["--defense-tau", "0.999"],
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_configured_defense_is_applied_reported_and_keeps_the_models_label(digits_run, name):
    model = digits_run[0] / "model.onnx"
    images = digits_test_images(16)
    ref = reference_probabilities(model, images)
    with serve(model, "--output-defense", name, *CASES[name]) as s:
        info = httpx.get(s.url + "/v1/model").json()["output_defense"]
        assert info["name"] == name
        body = httpx.post(s.url + "/predict", files=files([png(a) for a in images])).json()
    got = np.array([p["probabilities"] for p in body["predictions"]])
    assert np.allclose(got.sum(1), 1, atol=1e-6)
    assert [p["label"] for p in body["predictions"]] == ref.argmax(1).tolist()
    if name == "none":
        assert np.abs(got - ref).max() < 1e-6
    elif name == "topk":
        assert info["params"] == {"k": 2}
        assert ((got > 0).sum(1) <= 2).all() and (got.argmax(1) == ref.argmax(1)).all()
    elif name == "round":
        assert np.allclose(got * 100, np.round(got * 100), atol=1e-4)
    elif name == "label_only":
        assert np.array_equal(got, np.eye(10)[ref.argmax(1)])
    else:
        assert np.abs(got - ref).max() > 1e-3  # perturbed
