"""The Open Inference Protocol through the official client (tritonclient[http]): every call of its API that applies
to a classifier, unversioned and versioned, JSON and binary tensor data, against the real server."""
from __future__ import annotations

import numpy as np
import pytest

tritonclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is a dev dependency")
from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from conftest import serve  # noqa: E402
from helpers import digits_test_images, reference_probabilities  # noqa: E402

NAME = "digits-ast"


def auth() -> dict:
    """A fresh headers dict per call: the client writes Inference-Header-Content-Length into the one it is given."""
    return {"Authorization": "Bearer k"}


@pytest.fixture(scope="module")
def server(digits_run):
    with serve(digits_run[0] / "model.onnx", "--api-keys", "k") as s:
        yield s, digits_run[0] / "model.onnx"


@pytest.fixture
def client(server):
    c = InferenceServerClient(url=server[0].url.removeprefix("http://"))
    yield c
    c.close()


def _input(images: np.ndarray, datatype: str, binary: bool) -> InferInput:
    x = images[:, None].astype(np.float32) / 255.0 if datatype == "FP32" else images[:, None].astype(np.uint8)
    i = InferInput("image", list(x.shape), datatype)
    i.set_data_from_numpy(x, binary_data=binary)
    return i


def test_health_and_metadata_calls(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["name"] == "astguard"
    for version in ("", "1"):
        assert client.is_model_ready(NAME, version, headers=auth())
        meta = client.get_model_metadata(NAME, version, headers=auth())
        assert meta["versions"] == ["1"] and meta["inputs"][0]["shape"] == [-1, 1, 8, 8]
    assert not client.is_model_ready(NAME, "2", headers=auth())  # 404: not ready, not an exception


@pytest.mark.parametrize("version", ["", "1"])
@pytest.mark.parametrize("datatype", ["FP32", "UINT8"])
@pytest.mark.parametrize("binary_in, binary_out", [(False, False), (True, True), (True, False), (False, True)])
def test_infer_json_and_binary_gives_the_models_probabilities(server, client, version, datatype, binary_in,
                                                              binary_out):
    images = digits_test_images(5)
    result = client.infer(NAME, [_input(images, datatype, binary_in)], model_version=version, headers=auth(),
                          outputs=[InferRequestedOutput("probabilities", binary_data=binary_out)])
    got = result.as_numpy("probabilities")
    np.testing.assert_allclose(got, reference_probabilities(server[1], images), atol=1e-5)
    assert result.get_response()["model_version"] == "1"


def test_the_clients_defaults_binary_both_ways_with_and_without_an_id(server, client):
    images = digits_test_images(3)
    result = client.infer(NAME, [_input(images, "FP32", True)], headers=auth())  # no outputs: binary_data_output
    np.testing.assert_allclose(result.as_numpy("probabilities"), reference_probabilities(server[1], images),
                               atol=1e-5)
    assert "id" not in result.get_response()
    assert client.infer(NAME, [_input(images, "FP32", True)], request_id="r-7", headers=auth()
                        ).get_response()["id"] == "r-7"


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(server, client, algorithm):
    images = digits_test_images(2)
    result = client.infer(NAME, [_input(images, "FP32", True)], headers=auth(),
                          request_compression_algorithm=algorithm)
    np.testing.assert_allclose(result.as_numpy("probabilities"), reference_probabilities(server[1], images),
                               atol=1e-5)


@pytest.mark.parametrize("call, status, words", [
    (lambda c: c.infer("other", [_input(digits_test_images(1), "FP32", True)], headers=auth()), "404",
     "unknown model"),
    (lambda c: c.infer(NAME, [_input(digits_test_images(1), "FP32", True)], model_version="9", headers=auth()),
     "404", "unknown version"),
    (lambda c: c.get_model_metadata(NAME, "9", headers=auth()), "404", "unknown version"),
    (lambda c: c.infer(NAME, [_input(digits_test_images(1), "FP32", True)]), "401", "key"),
    (lambda c: c.get_model_config(NAME, headers=auth()), "404", "Not Found"),  # Triton's own extension
    (lambda c: c.infer(NAME, [InferInput("image", [1, 1, 8, 8], "FP32").set_data_from_numpy(
        np.full((1, 1, 8, 8), 2.0, np.float32))], headers=auth()), "400", "[0, 1]"),
])
def test_errors_reach_the_client_as_messages(client, call, status, words):
    with pytest.raises(InferenceServerException) as e:
        call(client)
    assert e.value.status() == status and words in e.value.message(), e.value.message()
