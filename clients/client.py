"""A typed client for the astguard service, sync and async, on httpx.

    with AstguardClient("http://127.0.0.1:8000", api_key="...") as client:
        for p in client.predict(["cat.png", pil_image, uint8_array]):
            print(p.label, p.class_name, p.probabilities.max())

Errors come back as exceptions carrying the server's message; rate limits (429) and 503s are retried, honouring
Retry-After; an exhausted budget is raised at once, since retrying cannot help before the period resets.
"""
from __future__ import annotations

import asyncio
import io
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import httpx
import numpy as np

from astguard.card import PROBABILITIES  # the answer's field is the model's output name

ImageLike = Union[str, Path, bytes, "PIL.Image.Image", np.ndarray]  # noqa: F821


class AstguardError(Exception):
    """An answer other than 2xx, or no answer. `status` is None when the server could not be reached."""

    def __init__(self, message: str, status: int | None = None, reason: str | None = None,
                 retry_after: float | None = None, budget_remaining: int | None = None):
        super().__init__(message)
        self.message, self.status, self.reason = message, status, reason
        self.retry_after, self.budget_remaining = retry_after, budget_remaining


class Unreachable(AstguardError):
    """The server could not be reached (`retryable`: no request reached it) or stopped answering."""

    retryable = False


def _unreachable(url: str, e: httpx.TransportError) -> Unreachable:
    error = Unreachable(f"cannot reach {url}: {type(e).__name__}: {e}")
    error.retryable = isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout))
    return error


class Unauthorized(AstguardError):
    """401: missing or unknown API key."""


class BadInput(AstguardError):
    """400/422: the request or one of its images is wrong; the message names it."""


class TooLarge(AstguardError):
    """413: body, image count or image size over the server's limit."""


class UnsupportedMedia(AstguardError):
    """415: not an image, or not a body the server takes."""


class RateLimited(AstguardError):
    """429 from the rate limit: wait `retry_after` seconds."""


class BudgetExhausted(AstguardError):
    """429: the key's image budget for this period is spent (`budget_remaining` images left)."""


class Unavailable(AstguardError):
    """503 or another 5xx."""


_BY_STATUS = {400: BadInput, 401: Unauthorized, 404: BadInput, 413: TooLarge, 415: UnsupportedMedia,
              422: BadInput, 503: Unavailable}


@dataclass(frozen=True)
class Prediction:
    probabilities: np.ndarray  # float32 [classes], after the server's output defense
    label: int  # the model's top-1
    class_name: str


@dataclass(frozen=True)
class PredictResult:
    predictions: list[Prediction]
    model: dict  # name, version, sha256
    budget_remaining: int | None  # from X-Budget-Remaining, when the server keeps budgets


def encode_png(image: ImageLike) -> bytes:
    """PNG bytes for a path, raw bytes (sent as they are), a PIL image, or a uint8 array (HW, HWC or CHW)."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    if isinstance(image, bytes):
        return image
    if isinstance(image, np.ndarray):
        a = image
        if a.dtype != np.uint8:
            raise TypeError(f"arrays must be uint8 pixels, got {a.dtype}")
        if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3, 4):
            a = a.transpose(1, 2, 0)  # CHW, as training's tensors are
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim not in (2, 3):
            raise TypeError(f"an image array must be HW, HWC or CHW, got shape {image.shape}")
        image = Image.fromarray(a)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _number(text: str | None, kind=float):
    """A header's number, or None when absent or not a number (Retry-After may also be an HTTP date)."""
    try:
        return kind(text) if text is not None else None
    except ValueError:
        return None


def _error(response: httpx.Response) -> AstguardError:
    try:
        body = response.json()
        message = body.get("detail") or body.get("error") or response.text
        reason = body.get("reason")
    except (ValueError, AttributeError):  # not JSON, or JSON that is not an object (a proxy's page)
        message, reason = response.text or response.reason_phrase, None
    kw = dict(status=response.status_code, reason=reason, retry_after=_number(response.headers.get("retry-after")),
              budget_remaining=_number(response.headers.get("x-budget-remaining"), int))
    if response.status_code == 429:
        cls = BudgetExhausted if reason == "budget_exhausted" else RateLimited
    else:
        cls = _BY_STATUS.get(response.status_code, Unavailable if response.status_code >= 500 else AstguardError)
    return cls(f"{response.status_code}: {message}", **kw)


def _result(response: httpx.Response) -> PredictResult:
    body = response.json()
    remaining = response.headers.get("x-budget-remaining")
    return PredictResult([Prediction(np.asarray(p[PROBABILITIES], np.float32), p["label"], p["class_name"])
                          for p in body["predictions"]], body["model"],
                         int(remaining) if remaining is not None else None)


class _Base:
    def __init__(self, url: str, api_key: str | None = None, *, timeout: float = 60, batch_size: int = 32,
                 retries: int = 5, backoff: float = 0.25):
        self.url, self.batch_size, self.retries, self.backoff = url.rstrip("/"), batch_size, retries, backoff
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout

    def _delay(self, attempt: int, error: AstguardError) -> float | None:
        """Seconds to wait before trying again, or None to give up. Only answers that say the request was not
        processed are retried (429, 503, no connection): a read timeout or another 5xx may come after the server
        charged the budget, and a retry would pay twice."""
        retryable = isinstance(error, RateLimited) or (isinstance(error, Unavailable) and error.status == 503) \
            or (isinstance(error, Unreachable) and error.retryable)
        if attempt >= self.retries or not retryable:
            return None
        jitter = random.uniform(0, self.backoff)
        return max(error.retry_after or 0.0, self.backoff * 2 ** attempt + jitter)

    @staticmethod
    def _files(blobs: Sequence[bytes]) -> list:
        return [("files", (f"image{i}.png", b, "image/png")) for i, b in enumerate(blobs)]


class AstguardClient(_Base):
    """Synchronous client. `predict` splits large lists into requests of `batch_size` images."""

    def __init__(self, url: str, api_key: str | None = None, **kw):
        super().__init__(url, api_key, **kw)
        self.http = httpx.Client(base_url=self.url, headers=self.headers, timeout=self.timeout)

    def _send(self, method: str, path: str, **kw) -> httpx.Response:
        attempt = 0
        while True:
            try:
                r = self.http.request(method, path, **kw)
                if r.is_success:
                    return r
                error = _error(r)
            except httpx.TransportError as e:
                error = _unreachable(self.url, e)
            delay = self._delay(attempt, error)
            if delay is None:
                raise error
            time.sleep(delay)
            attempt += 1

    def predict_batch(self, images: Sequence[ImageLike]) -> PredictResult:
        """One request; the server's per-request limit applies."""
        return _result(self._send("POST", "/predict", files=self._files([encode_png(i) for i in images])))

    def predict(self, images: Sequence[ImageLike]) -> list[Prediction]:
        out: list[Prediction] = []
        for i in range(0, len(images), self.batch_size):
            out += self.predict_batch(images[i:i + self.batch_size]).predictions
        return out

    def model_info(self) -> dict[str, Any]:
        """The model card, provider, output defense and limits (GET /v1/model)."""
        return self._send("GET", "/v1/model").json()

    def close(self) -> None:
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncAstguardClient(_Base):
    """The asyncio twin of AstguardClient; `predict` sends its requests concurrently (up to `concurrency`)."""

    def __init__(self, url: str, api_key: str | None = None, *, concurrency: int = 4, **kw):
        super().__init__(url, api_key, **kw)
        self.concurrency = concurrency
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.http = httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=self.timeout, limits=limits)

    async def _send(self, method: str, path: str, **kw) -> httpx.Response:
        attempt = 0
        while True:
            try:
                r = await self.http.request(method, path, **kw)
                if r.is_success:
                    return r
                error = _error(r)
            except httpx.TransportError as e:
                error = _unreachable(self.url, e)
            delay = self._delay(attempt, error)
            if delay is None:
                raise error
            await asyncio.sleep(delay)
            attempt += 1

    async def predict_encoded(self, blobs: Sequence[bytes]) -> PredictResult:
        """One request of already-encoded images (the attacker encodes once, ahead of time)."""
        return _result(await self._send("POST", "/predict", files=self._files(blobs)))

    async def predict_batch(self, images: Sequence[ImageLike]) -> PredictResult:
        return await self.predict_encoded([encode_png(i) for i in images])

    async def predict(self, images: Sequence[ImageLike]) -> list[Prediction]:
        gate = asyncio.Semaphore(self.concurrency)

        async def one(chunk):
            async with gate:
                return (await self.predict_batch(chunk)).predictions

        chunks = [images[i:i + self.batch_size] for i in range(0, len(images), self.batch_size)]
        return [p for part in await asyncio.gather(*[one(c) for c in chunks]) for p in part]

    async def model_info(self) -> dict[str, Any]:
        return (await self._send("GET", "/v1/model")).json()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.aclose()
