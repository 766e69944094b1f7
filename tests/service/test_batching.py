"""The micro-batcher, in-process, on the real digits model held at a gate: the test decides when a call finishes,
so which requests share a call is certain, not a matter of timing."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from helpers import digits_test_images
from service.batching import MicroBatcher, Runner
from service.runtime import OnnxModel


class Gated:
    """The real model; each call announces itself and waits until the test opens the gate."""

    def __init__(self, model: OnnxModel, fail_on_call: int | None = None):
        self.model, self.fail_on_call = model, fail_on_call
        self.calls: list[int] = []
        self.entered = threading.Semaphore(0)
        self.gate = threading.Semaphore(0)

    def predict(self, images, submitted=None):
        self.calls.append(len(images))
        self.entered.release()
        self.gate.acquire()
        if len(self.calls) == self.fail_on_call:
            raise RuntimeError("onnxruntime failed")
        return self.model.predict(images, submitted)


@pytest.fixture(scope="module")
def model(digits_run) -> OnnxModel:
    return OnnxModel(digits_run[0] / "model.onnx", device="cpu")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return (digits_test_images(12).astype(np.float32) / 255.0)[:, None]


async def _until(condition, limit_s: float = 30) -> None:
    """Yield to the event loop (the collector runs) until the condition holds; the limit only stops a broken batcher
    from hanging the suite."""
    give_up = asyncio.get_running_loop().time() + limit_s
    while not condition():
        assert asyncio.get_running_loop().time() < give_up, "the condition never held"
        await asyncio.sleep(0)


async def _entered(gated: Gated, limit_s: float = 30) -> None:
    """Wait until the next call reaches the model (the limit only stops a broken batcher from hanging the suite)."""
    assert await asyncio.to_thread(gated.entered.acquire, timeout=limit_s), "no call reached the model"


def run_batcher(gated: Gated, script, max_batch_size: int = 64, workers: int = 1):
    observed = []

    async def main():
        batcher = MicroBatcher(gated, workers, lambda n, t: observed.append(n), max_batch_size, max_wait_ms=50)
        await batcher.start()
        try:
            return await script(batcher)
        finally:
            for _ in range(16):  # let any call still at the gate finish before the pool shuts down
                gated.gate.release()
            await batcher.stop()

    return asyncio.run(main()), observed


def test_requests_that_arrive_while_the_model_is_busy_leave_together_in_the_next_call(model, images):
    gated = Gated(model)

    async def script(batcher):
        first = asyncio.create_task(batcher.predict(images[:1]))
        await _entered(gated)  # the first call holds the one slot
        rest = [asyncio.create_task(batcher.predict(images[i:i + 1])) for i in (1, 2, 3)]
        await _until(lambda: batcher.queue.qsize() == 3)
        for _ in range(50):  # however long they wait, no batch closes while the one slot is busy
            await asyncio.sleep(0)
        assert batcher.queue.qsize() == 3
        gated.gate.release()
        await _entered(gated)
        gated.gate.release()
        return await asyncio.gather(first, *rest)

    answers, observed = run_batcher(gated, script)
    assert gated.calls == [1, 3] and observed == [1, 3]
    for i, probs in enumerate(answers):  # each request gets its own rows back, whatever it was batched with
        np.testing.assert_allclose(probs, model.predict(images[i:i + 1])[0], rtol=0, atol=1e-6)


def test_a_batch_never_exceeds_the_limit_and_never_splits_a_request(model, images):
    gated = Gated(model)

    async def script(batcher):
        first = asyncio.create_task(batcher.predict(images[:1]))
        await _entered(gated)
        a = asyncio.create_task(batcher.predict(images[1:4]))
        b = asyncio.create_task(batcher.predict(images[4:7]))
        await _until(lambda: batcher.queue.qsize() == 2)
        for _ in range(3):
            gated.gate.release()
            if len(gated.calls) < 3:
                await _entered(gated)
        return await asyncio.gather(first, a, b)

    (first, a, b), _ = run_batcher(gated, script, max_batch_size=4)
    assert gated.calls == [1, 3, 3]  # 3 + 3 > 4: the second request starts the next call
    np.testing.assert_allclose(np.concatenate([first, a, b]), model.predict(images[:7])[0], rtol=0, atol=1e-6)


def test_a_request_as_large_as_a_batch_goes_straight_to_the_model(model, images):
    gated = Gated(model)

    async def script(batcher):
        task = asyncio.create_task(batcher.predict(images[:8]))
        await _entered(gated)
        gated.gate.release()
        return await task

    probs, observed = run_batcher(gated, script, max_batch_size=8)
    assert gated.calls == [8] and observed == [8] and probs.shape == (8, 10)


def test_a_failed_call_fails_every_request_in_it_and_frees_its_slot(model, images):
    gated = Gated(model, fail_on_call=2)

    async def script(batcher):
        first = asyncio.create_task(batcher.predict(images[:1]))
        await _entered(gated)
        doomed = [asyncio.create_task(batcher.predict(images[i:i + 1])) for i in (1, 2)]
        await _until(lambda: batcher.queue.qsize() == 2)
        gated.gate.release()
        await _entered(gated)
        gated.gate.release()  # the second call raises
        results = await asyncio.gather(first, *doomed, return_exceptions=True)
        later = asyncio.create_task(batcher.predict(images[3:4]))
        await _entered(gated)
        gated.gate.release()
        return results, await later

    (results, later), _ = run_batcher(gated, script)
    assert isinstance(results[0], np.ndarray)
    assert [str(r) for r in results[1:]] == ["onnxruntime failed"] * 2
    assert gated.calls == [1, 2, 1] and later.shape == (1, 10)


def test_without_micro_batching_each_request_is_its_own_call(model, images):
    observed = []

    async def main():
        runner = Runner(model, 2, lambda n, t: observed.append(n))
        try:
            return await asyncio.gather(*(runner.predict(images[i:i + 2]) for i in (0, 2, 4)))
        finally:
            await runner.stop()

    answers = asyncio.run(main())
    assert sorted(observed) == [2, 2, 2]
    np.testing.assert_allclose(np.concatenate(answers), model.predict(images[:6])[0], rtol=0, atol=1e-6)
