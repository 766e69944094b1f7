"""Inference off the event loop: a bounded thread pool, and optional micro-batching in front of it.

With micro-batching, concurrent requests wait at most `max_wait_ms` to be joined into one onnxruntime call of
up to `max_batch_size` images: one call on 16 images costs far less than 16 calls on one.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from service.runtime import OnnxModel, Timing

Observer = Callable[[int, Timing], None]  # called once per onnxruntime call: (images, timing)


class Runner:
    """Runs the model in a bounded pool, one call per request."""

    def __init__(self, model: OnnxModel, workers: int, observe: Observer):
        self.model, self.observe = model, observe
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="onnxruntime")

    async def predict(self, images: np.ndarray) -> np.ndarray:
        probs, timing = await asyncio.get_running_loop().run_in_executor(
            self.pool, self.model.predict, images, time.perf_counter())
        self.observe(len(images), timing)
        return probs

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.pool.shutdown(wait=True)


@dataclass
class _Pending:
    images: np.ndarray
    future: asyncio.Future
    submitted: float = field(default_factory=time.perf_counter)


class MicroBatcher(Runner):
    """Joins concurrent requests into shared onnxruntime calls; a request is never split across calls unless it
    alone exceeds `max_batch_size`."""

    def __init__(self, model: OnnxModel, workers: int, observe: Observer, max_batch_size: int, max_wait_ms: float):
        super().__init__(model, workers, observe)
        self.max_batch_size, self.max_wait_s = max_batch_size, max_wait_ms / 1000
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._slots = asyncio.Semaphore(workers)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._collect())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        await super().stop()

    async def predict(self, images: np.ndarray) -> np.ndarray:
        if len(images) >= self.max_batch_size:  # already a full batch: nothing to join
            return await super().predict(images)
        pending = _Pending(images, asyncio.get_running_loop().create_future())
        await self.queue.put(pending)
        return await pending.future

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        carry: _Pending | None = None
        while True:
            # A free slot first, then the batch: requests that arrive while the model is busy wait in the queue
            # and leave together in the next call, instead of in small batches closed by the deadline alone.
            await self._slots.acquire()
            first = carry or await self.queue.get()
            carry, batch, n = None, [first], len(first.images)
            deadline = first.submitted + self.max_wait_s
            while n < self.max_batch_size:
                try:
                    nxt = self.queue.get_nowait() if self.queue.qsize() else await asyncio.wait_for(
                        self.queue.get(), max(0.0, deadline - time.perf_counter()))
                except asyncio.TimeoutError:
                    break
                if n + len(nxt.images) > self.max_batch_size:
                    carry = nxt  # starts the next batch
                    break
                batch.append(nxt)
                n += len(nxt.images)
            loop.create_task(self._run(batch))

    async def _run(self, batch: list[_Pending]) -> None:
        try:
            images = np.concatenate([p.images for p in batch])
            submitted = min(p.submitted for p in batch)
            probs, timing = await asyncio.get_running_loop().run_in_executor(
                self.pool, self.model.predict, images, submitted)
            self.observe(len(images), timing)
            start = 0
            for p in batch:
                if not p.future.done():
                    p.future.set_result(probs[start:start + len(p.images)])
                start += len(p.images)
        except Exception as e:  # hand the failure to every waiting request
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
        finally:
            self._slots.release()
