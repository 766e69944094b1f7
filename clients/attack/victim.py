"""Who answers the thief's queries: one interface, a live endpoint or an in-process ONNX model.

A victim fills the unanswered (NaN) rows of a probability array for uint8 images of its input shape, and says why
it stopped. Answers already bought are in the array whatever happens, so a caller can always save them.
"""
from __future__ import annotations

import asyncio
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Protocol

import numpy as np
import torch
from tqdm import tqdm

from astguard.card import ModelCard
from clients.client import AsyncAstguardClient, BudgetExhausted, encode_png
from service.defenses import DEFENSES, make_defense
from service.runtime import OnnxModel  # onnxruntime itself is imported only when an OnnxVictim is made

PLAN_COMPLETE, BUDGET_EXHAUSTED = "plan complete", "server budget exhausted"


class Victim(Protocol):
    card: ModelCard
    defense: dict  # the output defense in force: {"name", "params", "summary"}

    async def answer(self, images: torch.Tensor, probs: np.ndarray, *, progress: bool = False
                     ) -> tuple[str, float]:
        """Fill the NaN rows of `probs` [N, classes] with the answers for uint8 `images` [N, C, H, W]; return why
        it stopped (PLAN_COMPLETE or BUDGET_EXHAUSTED) and the seconds it took."""
        ...


class EndpointVictim:
    """A live astguard service, queried as a real client would: PNG images, several per request, concurrently,
    429/503 retried (by the client) honouring Retry-After."""

    def __init__(self, client: AsyncAstguardClient, info: dict, *, images_per_request: int, concurrency: int):
        self.client = client
        self.card = ModelCard.from_dict(info["card"])
        self.defense = info["output_defense"]
        self.images_per_request, self.concurrency = images_per_request, concurrency

    async def answer(self, images: torch.Tensor, probs: np.ndarray, *, progress: bool = False
                     ) -> tuple[str, float]:
        return await query_victim(self.client, images, probs, images_per_request=self.images_per_request,
                                  concurrency=self.concurrency, progress=progress)


@asynccontextmanager
async def open_endpoint(url: str, api_key: str | None = None, *, images_per_request: int = 16,
                        concurrency: int = 4, retries: int = 6) -> AsyncIterator[EndpointVictim]:
    """The service at `url` as a victim (its card read from /v1/model); the connection is closed afterwards.
    Raises the client's errors (Unreachable, Unauthorized, ...) and CardError for a card that is not valid."""
    client = AsyncAstguardClient(url, api_key, concurrency=concurrency, batch_size=images_per_request,
                                 retries=retries)
    try:
        info = await client.model_info()
        yield EndpointVictim(client, info, images_per_request=images_per_request, concurrency=concurrency)
    finally:
        await client.aclose()


class BlockingEndpoint:
    """A live service for synchronous code (the attacks train between their queries): the client's event loop runs
    in a daemon thread, and `answer` blocks the caller until the answers are in. Ctrl-C interrupts the caller, not
    a thread it would have to wait for.

        with BlockingEndpoint(url, key) as endpoint:
            endpoint.answer(images, probs)
    """

    def __init__(self, url: str, api_key: str | None = None, *, images_per_request: int = 16, concurrency: int = 4,
                 retries: int = 6):
        self.url, self.api_key = url, api_key
        self.images_per_request, self.concurrency, self.retries = images_per_request, concurrency, retries
        self.victim: EndpointVictim | None = None

    def __enter__(self) -> "BlockingEndpoint":
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="astguard-endpoint", daemon=True)
        self._thread.start()
        try:
            self.victim = self.call(self._open())
        except BaseException:
            self._stop()
            raise
        return self

    async def _open(self) -> EndpointVictim:
        client = AsyncAstguardClient(self.url, self.api_key, concurrency=self.concurrency,
                                     batch_size=self.images_per_request, retries=self.retries)
        try:
            info = await client.model_info()
            return EndpointVictim(client, info, images_per_request=self.images_per_request,
                                  concurrency=self.concurrency)
        except BaseException:
            await client.aclose()
            raise

    def call(self, coroutine):
        """Run a coroutine on the endpoint's loop and wait for its result (its exception is raised here)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    @property
    def card(self) -> ModelCard:
        return self.victim.card

    @property
    def defense(self) -> dict:
        return self.victim.defense

    def answer(self, images: torch.Tensor, probs: np.ndarray, *, progress: bool = False) -> tuple[str, float]:
        return self.call(self.victim.answer(images, probs, progress=progress))

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def __exit__(self, *exc) -> None:
        try:
            if self.victim is not None:
                self.call(self.victim.client.aclose())
        finally:
            self._stop()


async def query_victim(client: AsyncAstguardClient, images: torch.Tensor, probs: np.ndarray, *,
                       images_per_request: int, concurrency: int, progress: bool) -> tuple[str, float]:
    """Fill the NaN rows of `probs` with the service's answers for `images`. Returns (why it stopped, seconds).

    Stops at the end of the plan or when the server's budget runs out (what is left of it is spent on part of a
    request); a server that stops answering raises Unreachable/Unavailable after the client's retries, with every
    answer so far already in `probs`.
    """
    todo = np.flatnonzero(np.isnan(probs).any(1))
    chunks = asyncio.Queue()
    for i in range(0, len(todo), images_per_request):
        chunks.put_nowait(todo[i:i + images_per_request])
    stop = {"reason": PLAN_COMPLETE}
    bar = tqdm(total=len(todo), desc="querying", unit="img", disable=not progress)

    async def send(idx: np.ndarray) -> None:
        blobs = await asyncio.to_thread(lambda: [encode_png(images[i].numpy()) for i in idx])
        try:
            result = await client.predict_encoded(blobs)
        except BudgetExhausted as e:
            stop["reason"] = BUDGET_EXHAUSTED
            left = e.budget_remaining or 0
            if not 0 < left < len(idx):
                return
            try:  # spend what is left on part of the chunk; another worker may get there first
                idx, result = idx[:left], await client.predict_encoded(blobs[:left])
            except BudgetExhausted:
                return
        probs[idx] = np.stack([p.probabilities for p in result.predictions])
        bar.update(len(idx))

    failures: list[BaseException] = []

    async def worker() -> None:
        while stop["reason"] == PLAN_COMPLETE and not chunks.empty() and not failures:
            try:
                await send(chunks.get_nowait())
            except Exception as e:  # stop the others from starting new requests; theirs in flight finish
                failures.append(e)

    start = time.perf_counter()
    try:
        # Every worker ends before this returns, so answers already paid for are in `probs` when the caller saves.
        await asyncio.gather(*[worker() for _ in range(concurrency)])
    finally:
        bar.close()
    if failures:
        raise failures[0]
    return stop["reason"], time.perf_counter() - start


class OnnxVictim:
    """An exported model in onnxruntime behind a serving-time output defense: what the service would answer,
    without HTTP (the evaluation's served teachers). Needs onnxruntime (the serve or gpu extra)."""

    def __init__(self, onnx_path: str | Path, *, defense: str = "none", params: dict | None = None,
                 models: dict[str, str | Path] | None = None, device: str = "cpu", threads: int | None = None,
                 batch_size: int = 512):
        threads = threads or torch.get_num_threads()
        self.model = OnnxModel(Path(onnx_path), device=device, intra_op_threads=threads)
        self.card = self.model.card
        self._defend, bound = make_defense(defense, **(params or {}))
        needed = DEFENSES.entry(defense).get("models", ())
        missing = set(needed) - set(models or {})
        if missing:
            raise ValueError(f"the {defense} defense needs the {sorted(missing)[0]} model beside the served one")
        # The models the defense reads, answering the same images, as the service runs them.
        self.others = {name: OnnxModel(Path(models[name]), device=device, intra_op_threads=threads) for name in needed}
        self.defense = {"name": defense, "params": bound, "summary": DEFENSES.entry(defense).summary}
        self.batch_size = batch_size

    async def answer(self, images: torch.Tensor, probs: np.ndarray, *, progress: bool = False
                     ) -> tuple[str, float]:
        start = time.perf_counter()
        todo = np.flatnonzero(np.isnan(probs).any(1))
        for i in range(0, len(todo), self.batch_size):
            idx = todo[i:i + self.batch_size]
            x = images[torch.from_numpy(idx)].float().div(255.0).numpy()
            probs[idx] = self._defend(self.model.predict(x)[0], **{n: m.predict(x)[0] for n, m in self.others.items()})
        return PLAN_COMPLETE, time.perf_counter() - start


def answers(victim: Victim, images: torch.Tensor, *, progress: bool = False) -> np.ndarray:
    """Every answer for `images`, synchronously (NaN rows where the victim stopped early)."""
    probs = np.full((len(images), victim.card.num_classes), np.nan, np.float32)
    asyncio.run(victim.answer(images, probs, progress=progress))
    return probs
