"""Bad input gets a 4xx with a message naming the problem, never a 5xx, and the server keeps serving."""
import json

import httpx
import numpy as np
import pytest

from conftest import serve
from helpers import b64, digits_test_images, files, png, png_header_only


@pytest.fixture(scope="module")
def server(digits_run):
    with serve(digits_run[0] / "model.onnx", "--max-body-bytes", "200000", "--max-images-per-request", "8",
               "--max-image-pixels", "1000000") as s:
        yield s


GOOD = png(digits_test_images(1)[0])


def post(server, **kw):
    return httpx.post(server.url + "/predict", **kw)


def test_a_truncated_image_gets_400_naming_which_one(server):
    r = post(server, files=[("files", ("ok.png", GOOD, "image/png")), ("files", ("cut.png", GOOD[:40], "image/png"))])
    assert r.status_code == 400 and "image 1 (cut.png)" in r.json()["detail"]


@pytest.mark.parametrize("blob,words", [(b"not an image at all", "not a readable image"), (b"", "empty")])
def test_undecodable_or_empty_files_get_400(server, blob, words):
    r = post(server, files=[("files", ("x.png", blob, "image/png"))])
    assert r.status_code == 400 and words in r.json()["detail"] and "image 0" in r.json()["detail"]


def test_a_body_over_the_limit_gets_413_by_content_length_and_while_streaming(server):
    big = b"\0" * 300_000
    assert post(server, files=[("files", ("big.png", big, "image/png"))]).status_code == 413

    def chunks():  # no Content-Length: the limit holds while the body streams in
        for _ in range(30):
            yield b"\0" * 10_000

    r = post(server, content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    v2 = httpx.post(server.url + "/v2/models/digits-ast/infer", content=chunks(),
                    headers={"content-type": "application/json"})
    assert v2.status_code == 413 and "limit" in v2.json()["error"]


def test_more_images_than_allowed_get_413(server):
    r = post(server, files=files([GOOD] * 9))
    assert r.status_code == 413 and "9 images" in r.json()["detail"]


@pytest.mark.parametrize("size", [(2000, 2000), (100_000, 100_000)])
def test_images_over_the_pixel_limit_get_413_before_their_pixels_are_decoded(server, size):
    r = post(server, files=[("files", ("bomb.png", png_header_only(*size), "image/png"))])
    assert r.status_code == 413 and "bomb.png" in r.json()["detail"]


def test_unsupported_content_types_get_415(server):
    r = post(server, content=b"hello", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    assert post(server, content=b"hello").status_code == 415
    r = post(server, files=[("files", ("a.txt", b"hello", "text/plain"))])
    assert r.status_code == 415 and "text/plain" in r.json()["detail"]


@pytest.mark.parametrize("body,status,words", [
    (b"{not json", 422, "invalid JSON"),
    (b'{"pictures": []}', 422, "images"),
    (b'{"images": []}', 422, "images"),
    (b'{"images": ["@@@not base64@@@"]}', 400, "image 0 is not valid base64"),
])
def test_malformed_json_or_base64_gets_a_reason(server, body, status, words):
    r = post(server, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status and words in r.json()["detail"], r.text


def test_multipart_without_images_gets_400(server):
    r = post(server, files=[("other", ("a.png", GOOD, "image/png"))])
    assert r.status_code == 400 and "no images" in r.json()["detail"]


@pytest.mark.parametrize("tensor,words", [
    ({"name": "image", "shape": [1, 3, 8, 8], "datatype": "UINT8", "data": [0] * 192}, "shape"),
    ({"name": "image", "shape": [1, 1, 8, 8], "datatype": "UINT8", "data": [0] * 63}, "63 values"),
    ({"name": "image", "shape": [1, 1, 8, 8], "datatype": "UINT8", "data": [300] * 64}, "0..255"),
    ({"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [2.0] * 64}, "[0, 1]"),
    ({"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [[0.5] * 32, [True] * 32]}, "got bool"),
    ({"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [[0.5] * 32, [0.5] * 31]}, "evenly"),
    ({"name": "pixels", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}, "unknown input"),
])
def test_v2_wrong_tensors_get_400_with_the_reason(server, tensor, words):
    r = httpx.post(server.url + "/v2/models/digits-ast/infer", json={"inputs": [tensor]})
    assert r.status_code == 400 and words in r.json()["error"], r.text


@pytest.mark.parametrize("tensor,words", [
    ({"name": "image", "shape": [1, 1, 8, 8], "datatype": "INT64", "data": [0] * 64}, "datatype"),
    ({"name": "image", "shape": [1, 1, 8, 8], "datatype": "", "data": [0] * 64}, "datatype"),
    ({"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": ["0.5"] * 64}, "data"),
    ({"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [True] * 64}, "data"),
    ({"name": "image", "shape": ["1", 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}, "shape"),
])
def test_v2_tensors_the_schema_refuses_get_422_in_the_protocols_error_shape(server, tensor, words):
    r = httpx.post(server.url + "/v2/models/digits-ast/infer", json={"inputs": [tensor]})
    assert r.status_code == 422 and words in r.json()["error"], r.text


def test_v2_refuses_to_serve_logits(server):
    r = httpx.post(server.url + "/v2/models/digits-ast/infer", json={
        "inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}],
        "outputs": [{"name": "logits"}]})
    assert r.status_code == 400 and "probabilities" in r.json()["error"]


def test_v2_malformed_request_gets_422_with_reasons(server):
    r = httpx.post(server.url + "/v2/models/digits-ast/infer", json={"inputs": [{"name": "image"}]})
    assert r.status_code == 422 and "shape" in r.json()["error"]


def test_after_all_the_bad_input_the_server_still_answers_and_never_sent_a_5xx(server):
    assert post(server, files=files([GOOD])).status_code == 200
    text = httpx.get(server.url + "/metrics").text
    assert not [line for line in text.splitlines() if line.startswith("astguard_requests_total")
                and 'status="5' in line]


def test_resize_policy_reject_refuses_other_sizes(digits_run):
    with serve(digits_run[0] / "model.onnx", "--resize-policy", "reject") as s:
        assert httpx.post(s.url + "/predict", files=files([GOOD])).status_code == 200
        big = png(np.zeros((16, 16), np.uint8))
        r = httpx.post(s.url + "/predict", files=files([big]))
        assert r.status_code == 400 and "16x16" in r.json()["detail"]


def test_a_v2_number_beyond_float_range_gets_400_not_500(server):
    data = [10 ** 400] + [0] * 63  # a valid JSON integer that no float can hold
    r = httpx.post(server.url + "/v2/models/digits-ast/infer", content=json.dumps(
        {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": data}]}),
        headers={"content-type": "application/json"})
    assert r.status_code == 400 and "float range" in r.json()["error"]


def test_formats_that_decode_while_opening_are_refused(server):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "ICO")  # Pillow's ICO plugin decodes its image inside Image.open
    r = post(server, files=[("files", ("x.ico", buf.getvalue(), "image/x-icon"))])
    assert r.status_code == 400 and "supported format" in r.json()["detail"]


@pytest.mark.parametrize("method, path, status, field", [
    ("GET", "/v2/models/digits-ast/nothing", 404, "error"),
    ("PUT", "/v2/models/digits-ast/infer", 405, "error"),
    ("GET", "/v2/models/digits-ast/versions/7", 404, "error"),
    ("GET", "/nothing", 404, "detail"),
    ("DELETE", "/predict", 405, "detail"),
])
def test_unknown_routes_and_methods_answer_in_the_apis_error_shape(server, method, path, status, field):
    r = httpx.request(method, server.url + path)
    assert r.status_code == status and set(r.json()) == {field, "reason"}, r.text
