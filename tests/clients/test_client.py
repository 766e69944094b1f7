"""The typed user client against a real server."""
import asyncio

import numpy as np
import pytest
from PIL import Image

from clients.client import (AstguardClient, AsyncAstguardClient, BadInput, BudgetExhausted, TooLarge, Unauthorized,
                            Unreachable, UnsupportedMedia, encode_png)
from conftest import free_port, serve
from training.data import load_dataset


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits").test


@pytest.fixture(scope="module")
def server(digits_run, tmp_path_factory):
    db = tmp_path_factory.mktemp("b") / "b.sqlite"
    with serve(digits_run[0] / "model.onnx", "--api-keys", "good", "--budget-images", "60", "--budget-db", str(db),
               "--max-images-per-request", "8") as s:
        yield s


def test_predict_takes_paths_pil_images_and_uint8_arrays_and_batches_them(server, digits, tmp_path):
    arrays = [digits.images[i, 0].numpy() for i in range(10)]
    path = tmp_path / "d.png"
    Image.fromarray(arrays[0]).save(path)
    with AstguardClient(server.url, "good", batch_size=4) as c:
        got = c.predict([path, Image.fromarray(arrays[1]), arrays[2], digits.images[3].numpy(), *arrays[4:]])
    assert len(got) == 10
    for i, p in enumerate(got):
        assert p.probabilities.shape == (10,) and abs(p.probabilities.sum() - 1) < 1e-6
        assert p.class_name == str(p.label)
    assert np.array_equal(got[0].probabilities, got[0].probabilities)
    assert (np.array([p.label for p in got]) == digits.labels[:10].numpy()).mean() >= 0.8


def test_model_info_and_the_async_client_agree_with_the_sync_one(server, digits):
    arrays = [digits.images[i, 0].numpy() for i in range(5)]
    with AstguardClient(server.url, "good") as c:
        info = c.model_info()
        sync = c.predict(arrays)

    async def go():
        async with AsyncAstguardClient(server.url, "good", batch_size=2, concurrency=3) as c:
            return await c.predict(arrays), await c.model_info()

    got, ainfo = asyncio.run(go())
    assert info == ainfo and info["card"]["name"] == "digits-ast"
    assert [p.label for p in got] == [p.label for p in sync]
    assert all(np.array_equal(a.probabilities, b.probabilities) for a, b in zip(got, sync))


def test_errors_come_back_as_exceptions_with_the_servers_message(server, digits):
    with AstguardClient(server.url, "wrong") as c, pytest.raises(Unauthorized, match="unknown API key"):
        c.predict([digits.images[0, 0].numpy()])
    with AstguardClient(server.url, "good") as c:
        with pytest.raises(TooLarge, match="over the limit of 8"):
            c.predict_batch([digits.images[0, 0].numpy()] * 9)
        with pytest.raises(BadInput, match="image 0"):
            c.predict_batch([b"not an image"])
        with pytest.raises(UnsupportedMedia):
            c._send("POST", "/predict", content=b"x", headers={"content-type": "text/plain"})


def test_an_exhausted_budget_raises_at_once_with_retry_after_and_what_is_left(digits_run, tmp_path, digits):
    with serve(digits_run[0] / "model.onnx", "--api-keys", "k", "--budget-images", "3",
               "--budget-db", str(tmp_path / "b.sqlite")) as s:
        with AstguardClient(s.url, "k", retries=5) as c:
            assert c.predict_batch([digits.images[0, 0].numpy()] * 2).budget_remaining == 1
            with pytest.raises(BudgetExhausted) as e:
                c.predict_batch([digits.images[0, 0].numpy()] * 2)
    assert e.value.status == 429 and e.value.budget_remaining == 1 and e.value.retry_after > 0


def test_an_unreachable_server_raises_unreachable_after_retries():
    with AstguardClient(f"http://127.0.0.1:{free_port()}", retries=1, backoff=0.01) as c:
        with pytest.raises(Unreachable, match="cannot reach"):
            c.model_info()


def test_encode_png_rejects_arrays_that_are_not_uint8_images():
    with pytest.raises(TypeError, match="uint8"):
        encode_png(np.zeros((8, 8), np.float32))
    with pytest.raises(TypeError, match="HW, HWC or CHW"):
        encode_png(np.zeros((2, 2, 2, 2), np.uint8))
