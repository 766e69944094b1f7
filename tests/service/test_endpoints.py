"""Every endpoint of a real server (uvicorn on 127.0.0.1) serving a model trained by the tests."""
import json

import httpx
import numpy as np
import pytest

from conftest import serve
from helpers import b64, digits_test_images, files, png, reference_probabilities


@pytest.fixture(scope="module")
def server(digits_run):
    with serve(digits_run[0] / "model.onnx", "--max-wait-ms", "5") as s:
        yield s


@pytest.fixture(scope="module")
def model_path(digits_run):
    return digits_run[0] / "model.onnx"


def test_predict_answers_each_multipart_image_in_request_order_as_the_model_does(server, model_path):
    images = digits_test_images(6)
    r = httpx.post(server.url + "/predict", files=files([png(a) for a in images]))
    assert r.status_code == 200, r.text
    body = r.json()
    card = json.loads(model_path.with_suffix(".json").read_text())
    assert body["model"] == {"name": card["name"], "version": card["version"], "sha256": card["sha256"]}
    ref = reference_probabilities(model_path, images)
    got = np.array([p["probabilities"] for p in body["predictions"]])
    assert np.abs(got - ref).max() < 1e-6
    assert [p["label"] for p in body["predictions"]] == ref.argmax(1).tolist()
    assert [p["class_name"] for p in body["predictions"]] == [str(i) for i in ref.argmax(1)]
    assert np.allclose(got.sum(1), 1, atol=1e-6)


def test_predict_takes_base64_json_with_or_without_a_data_url_prefix(server):
    images = [png(a) for a in digits_test_images(3)]
    multipart = httpx.post(server.url + "/predict", files=files(images)).json()
    as_json = httpx.post(server.url + "/predict", json={"images": [b64(images[0]), b64(images[1]),
                                                                   "data:image/png;base64," + b64(images[2])]})
    assert as_json.status_code == 200 and as_json.json() == multipart


def test_images_are_converted_to_the_models_colour_mode_and_resized_to_its_input(server, model_path):
    digit = digits_test_images(1)[0]
    rgb = np.repeat(digit[:, :, None], 3, axis=2)
    big = np.kron(digit, np.ones((4, 4), np.uint8))  # 32x32, each pixel a 4x4 block
    for variant in (png(rgb), png(big)):
        r = httpx.post(server.url + "/predict", files=files([variant]))
        assert r.status_code == 200
    # RGB of a grey image converts back exactly; the answer equals the grey image's.
    grey = httpx.post(server.url + "/predict", files=files([png(digit)])).json()["predictions"][0]
    colour = httpx.post(server.url + "/predict", files=files([png(rgb)])).json()["predictions"][0]
    assert colour == grey
    jpeg_like = httpx.post(server.url + "/predict", files=files([png(big)], "application/octet-stream"))
    assert jpeg_like.status_code == 200


def test_v2_infer_on_fp32_and_uint8_tensors_matches_predict(server):
    images = digits_test_images(4)
    expected = [p["probabilities"] for p in
                httpx.post(server.url + "/predict", files=files([png(a) for a in images])).json()["predictions"]]
    for datatype, data in (("UINT8", images.reshape(-1).tolist()),
                           ("FP32", (images.astype(np.float32) / 255).reshape(-1).tolist())):
        r = httpx.post(server.url + "/v2/models/digits-ast/infer", json={"id": "q1", "inputs": [
            {"name": "image", "shape": [4, 1, 8, 8], "datatype": datatype, "data": data}]})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["model_name"] == "digits-ast" and out["id"] == "q1"
        (tensor,) = out["outputs"]
        assert tensor["name"] == "probabilities" and tensor["shape"] == [4, 10] and tensor["datatype"] == "FP32"
        assert np.abs(np.array(tensor["data"]).reshape(4, 10) - np.array(expected)).max() < 1e-6


def test_v2_metadata_and_health_follow_the_open_inference_protocol(server):
    meta = httpx.get(server.url + "/v2/models/digits-ast").json()
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert httpx.get(server.url + "/v2/health/live").json() == {"live": True}
    assert httpx.get(server.url + "/v2/health/ready").json() == {"ready": True}
    assert httpx.get(server.url + "/v2/models/digits-ast/ready").status_code == 200
    assert httpx.get(server.url + "/v2").json()["name"] == "astguard"
    missing = httpx.get(server.url + "/v2/models/other")
    assert missing.status_code == 404 and "digits-ast" in missing.json()["error"]


def test_v1_model_reports_the_card_the_provider_and_the_defense_in_force(server, model_path):
    info = httpx.get(server.url + "/v1/model").json()
    assert info["card"] == json.loads(model_path.with_suffix(".json").read_text())
    assert info["provider"] == "CPUExecutionProvider"
    assert info["output_defense"]["name"] == "none"
    assert info["auth"] == "open" and info["limits"]["max_images_per_request"] == 64


def test_metrics_count_requests_by_route_and_status_images_and_rejections(server):
    before = server.metric("astguard_requests_total", route="/predict", status="200")
    served = server.metric("astguard_images_served_total", key="anonymous")
    httpx.post(server.url + "/predict", files=files([png(a) for a in digits_test_images(3)]))
    httpx.post(server.url + "/predict", content=b"x", headers={"content-type": "text/plain"})
    assert server.metric("astguard_requests_total", route="/predict", status="200") == before + 1
    assert server.metric("astguard_images_served_total", key="anonymous") == served + 3
    assert server.metric("astguard_rejections_total", reason="unsupported_media") >= 1
    text = httpx.get(server.url + "/metrics").text
    for name in ("astguard_request_seconds_bucket", "astguard_queue_seconds_bucket",
                 "astguard_compute_seconds_bucket", "astguard_batch_images_bucket"):
        assert name in text


def test_openapi_docs_describe_both_request_bodies_and_every_response_field(server):
    assert httpx.get(server.url + "/docs").status_code == 200
    spec = httpx.get(server.url + "/openapi.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}
    prediction = spec["components"]["schemas"]["Prediction"]["properties"]
    assert all(prediction[f].get("description") for f in ("probabilities", "label"))
    for route in ("/predict", "/v2/models/{name}/infer"):
        assert {"401", "413", "429"} <= set(spec["paths"][route]["post"]["responses"])


def test_concurrent_single_image_requests_are_coalesced_into_shared_onnxruntime_calls(digits_run):
    import asyncio

    async def burst(url, n):
        async with httpx.AsyncClient() as client:
            blob = png(digits_test_images(1)[0])
            return await asyncio.gather(*[client.post(url + "/predict", files=files([blob])) for _ in range(n)])

    for batching, expect_shared in (("--micro-batching", True), ("--no-micro-batching", False)):
        with serve(digits_run[0] / "model.onnx", batching, "--max-wait-ms", "50") as s:
            calls = s.metric("astguard_batch_images_count")
            responses = asyncio.run(burst(s.url, 16))
            assert all(r.status_code == 200 for r in responses)
            new_calls = s.metric("astguard_batch_images_count") - calls
            assert s.metric("astguard_batch_images_sum") >= 16
            assert (new_calls < 16) == expect_shared, new_calls
