"""Decoding, through the real server: the budget before the pixels, a bound on a request's decoded pixels, JPEG
draft decoding, and every accepted image mode giving the 8-bit original's answer (or a 400 that says why)."""
from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import serve
from helpers import digits_test_images, files, png, png_header_only
from service.images import open_image

N = 12


@pytest.fixture(scope="module")
def server(digits_run, tmp_path_factory):
    db = tmp_path_factory.mktemp("budgets") / "b.sqlite"
    with serve(digits_run[0] / "model.onnx", "--api-keys", "k,spent", "--budget-images", "1000",
               "--budget-db", str(db), "--max-request-pixels", "5000000") as s:
        yield s


def _upright() -> list[np.ndarray]:
    """Digits upscaled to 32x32 (nearest): big enough for rotations and resizing to matter."""
    return [np.kron(d, np.ones((4, 4), np.uint8)) for d in digits_test_images(N)]


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _answer(server, blobs: list[bytes], key="k") -> httpx.Response:
    return httpx.post(server.url + "/predict", files=files(blobs, "application/octet-stream"),
                      headers={"X-API-Key": key})


def _probs(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.array([p["probabilities"] for p in r.json()["predictions"]])


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


# Each encoding of the same upright digit, as a client might send it.
def sixteen_bit_png(a):  # a 16-bit grey PNG, full range: 0..255 * 257
    return _encode(Image.fromarray(a.astype(np.uint16) * 257), "PNG")


def exif_rotated_png(a):  # pixels stored rotated, with EXIF orientation 6 (display: rotate 90 clockwise)
    return _encode(Image.fromarray(a).transpose(Image.Transpose.ROTATE_90), "PNG", exif=_exif(6))


def exif_mirrored_png(a):  # orientation 2: mirrored
    return _encode(Image.fromarray(a).transpose(Image.Transpose.FLIP_LEFT_RIGHT), "PNG", exif=_exif(2))


def float_tiff(a):  # float32 in [0, 1]
    return _encode(Image.fromarray(a.astype(np.float32) / 255.0), "TIFF")


def sixteen_bit_tiff(a):
    return _encode(Image.fromarray(a.astype(np.uint16) * 257), "TIFF")


@pytest.mark.parametrize("encode", [sixteen_bit_png, exif_rotated_png, exif_mirrored_png, float_tiff,
                                    sixteen_bit_tiff], ids=lambda f: f.__name__)
def test_every_accepted_mode_gives_the_8_bit_originals_answer(server, encode):
    originals = _upright()
    want = _probs(_answer(server, [png(a) for a in originals]))
    got = _probs(_answer(server, [encode(a) for a in originals]))
    assert (got.argmax(1) == want.argmax(1)).all()
    np.testing.assert_allclose(got, want, atol=0.02)


def test_an_exif_rotated_jpeg_gives_the_upright_jpegs_answer(server):
    originals = _upright()
    want = _probs(_answer(server, [_encode(Image.fromarray(a), "JPEG", quality=95) for a in originals]))
    got = _probs(_answer(server, [_encode(Image.fromarray(a).transpose(Image.Transpose.ROTATE_270), "JPEG",
                                          quality=95, exif=_exif(8)) for a in originals]))
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.9  # JPEG's blocks fall differently on rotated pixels
    np.testing.assert_allclose(got, want, atol=0.15)


@pytest.mark.parametrize("blob, words", [
    (_encode(Image.fromarray(np.full((8, 8), 3.0, np.float32)), "TIFF"), "float image with values outside [0, 1]"),
    (_encode(Image.fromarray(np.full((8, 8), np.nan, np.float32)), "TIFF"), "not finite"),
    (_encode(Image.fromarray(np.full((8, 8), 70000, np.int32)), "TIFF"), "outside 0..65535"),
])
def test_modes_that_cannot_be_read_right_get_400_saying_why(server, blob, words):
    r = _answer(server, [blob])
    assert r.status_code == 400 and words in r.json()["detail"] and "image 0" in r.json()["detail"]


def test_an_exhausted_key_is_refused_before_any_image_is_decoded(server):
    for _ in range(20):
        assert _answer(server, [png(digits_test_images(1)[0])] * 50, key="spent").status_code == 200
    # A corrupt image past its header: decoding it would be a 400. The budget comes first: 429, nothing decoded.
    r = _answer(server, [png_header_only(64, 64)], key="spent")
    assert r.status_code == 429 and r.json()["reason"] == "budget_exhausted" and "Retry-After" in r.headers


def test_a_request_over_the_decoded_pixel_bound_gets_413_before_decoding(server):
    # Three 1500x1500 headers (2.25 MP each, under the per-image limit) add up to more than the 5 MP per request.
    r = _answer(server, [png_header_only(1500, 1500)] * 3)
    assert r.status_code == 413 and "ASTGUARD_MAX_REQUEST_PIXELS" in r.json()["detail"]
    assert r.json()["reason"] == "too_many_pixels"
    assert _answer(server, [png_header_only(1500, 1500)]).status_code == 400  # alone, it is decoded (and corrupt)


def test_large_jpegs_decode_at_a_reduced_size_and_still_count_as_their_draft():
    big = _encode(Image.fromarray(np.kron(digits_test_images(1)[0], np.ones((128, 128), np.uint8))), "JPEG")
    img = open_image(big, "image 0", mode="L", size=(8, 8), max_pixels=4096 * 4096)
    assert img.size == (128, 128)  # 1024x1024 decoded at 1/8 scale: still at least the model's 8x8


def test_the_limits_are_reported(server):
    limits = httpx.get(server.url + "/v1/model", headers={"X-API-Key": "k"}).json()["limits"]
    assert limits["max_request_pixels"] == 5000000
    assert {"max_concurrent_decodes", "header_timeout_s", "body_timeout_s", "max_connections"} <= set(limits)
