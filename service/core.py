"""What the service does, without HTTP: check access, charge the budget, run the model, apply the defense."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.access import ANONYMOUS, BudgetStore, KeyRing, RateLimiter, StoreUnavailable, make_stores
from service.batching import MicroBatcher, Runner
from service.config import Settings
from service.defenses import DEFENSES, make_defense
from service.detection import DETECTORS, DetectionStore, MemoryDetectionStore, bind_detector, make_detection_store
from service.errors import ClientError
from service.images import limit_pixels
from service.runtime import OnnxModel, StartupError, Timing

log = logging.getLogger("astguard.service")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """Prometheus metrics in a registry of the app's own, so several apps can live in one process (tests)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("astguard_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("astguard_request_seconds", "HTTP request latency", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("astguard_queue_seconds", "time an inference waited for the model",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.compute = Histogram("astguard_compute_seconds", "time onnxruntime computed",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("astguard_batch_images", "images per onnxruntime call",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.images = Counter("astguard_images_served", "images answered, by key id", ["key"], registry=r)
        self.extraction_score = Gauge("astguard_extraction_score", "the extraction detector's score, by key id",
                                      ["key"], registry=r)
        self.extraction_flagged = Counter("astguard_extraction_flagged", "keys flagged as extracting the model",
                                          registry=r)
        self.rejections = Counter("astguard_rejections", "requests refused, by reason", ["reason"], registry=r)

    def observe_call(self, images: int, timing: Timing) -> None:
        self.batch.observe(images)
        self.queue.observe(timing.queue_s)
        self.compute.observe(timing.compute_s)


def load_other_model(name: str, path: Path | None, model: OnnxModel, settings: Settings) -> OnnxModel:
    """A model an output defense reads beside the served one (`ASTGUARD_<NAME>_MODEL`): it must exist, be a model
    of that recipe, and answer the same question (same classes, same input)."""
    env = f"ASTGUARD_{name.upper()}_MODEL"
    if path is None:
        raise StartupError(f"ASTGUARD_OUTPUT_DEFENSE={settings.output_defense} needs {env}: the {name} model "
                           f"(astguard-train --teacher {name})")
    other = OnnxModel(Path(path), device=settings.device, intra_op_threads=settings.intra_op_threads)
    if other.card.teacher_type != name:
        raise StartupError(f"{env}={path} was trained as {other.card.teacher_type or 'an unknown recipe'!r}, "
                           f"not as {name!r}")
    if list(other.card.class_names) != model.class_names or other.card.input.shape != model.card.input.shape:
        raise StartupError(f"{env}={path} does not fit the served model: classes {list(other.card.class_names)} and "
                           f"input {list(other.card.input.shape)}, against {model.class_names} and "
                           f"{list(model.card.input.shape)}")
    return other


@dataclass
class Answer:
    probabilities: np.ndarray  # defended, [N, classes]
    labels: np.ndarray  # the model's own top-1, [N]
    remaining: int | None  # images left in the key's budget


@dataclass
class Service:
    settings: Settings
    model: OnnxModel
    keys: KeyRing
    budgets: BudgetStore
    limiter: RateLimiter
    metrics: Metrics
    defense_name: str
    defense_params: dict
    others: dict[str, OnnxModel] = field(default_factory=dict)  # the models the defense reads (by recipe name)
    detection: DetectionStore = field(default_factory=MemoryDetectionStore)
    admins: KeyRing = field(default_factory=lambda: KeyRing([]))
    runner: Runner = field(init=False)
    decoding: asyncio.Semaphore = field(init=False)
    ready: bool = False

    def __post_init__(self):
        self.defense, _ = make_defense(self.defense_name, **self.defense_params)
        s = self.settings
        self.detector, self.detector_params = bind_detector(
            s.detector, **{p: getattr(s, f"detector_{p}") for p in DETECTORS.entry(s.detector).params})
        self.degraded, _ = make_defense(s.degraded_defense, **{p: getattr(s, f"defense_{p}")
                                                               for p in DEFENSES.entry(s.degraded_defense).params})
        self.runner = self._runner(self.model)
        self.decoding = asyncio.Semaphore(s.max_concurrent_decodes)
        # Each other model answers the same images in its own batched call (its own micro-batcher).
        self.other_runners = {name: self._runner(m) for name, m in self.others.items()}

    def _runner(self, model: OnnxModel) -> Runner:
        s = self.settings
        if s.micro_batching:
            return MicroBatcher(model, s.inference_workers, self.metrics.observe_call, s.max_batch_size,
                                s.max_wait_ms)
        return Runner(model, s.inference_workers, self.metrics.observe_call)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Service":
        """Everything that can fail at start-up fails here, with one clear message (StartupError/ValueError)."""
        entry = DEFENSES.entry(settings.output_defense)
        params = {p: getattr(settings, f"defense_{p}") for p in entry.params}
        limit_pixels(settings.max_image_pixels)
        model = OnnxModel(settings.model, device=settings.device, intra_op_threads=settings.intra_op_threads)
        others = {name: load_other_model(name, getattr(settings, f"{name}_model"), model, settings)
                  for name in entry.get("models", ())}
        DETECTORS.entry(settings.detector)  # an unknown detector: one line, naming the known ones
        if DEFENSES.entry(settings.degraded_defense).get("models"):
            raise ValueError(f"ASTGUARD_DEGRADED_DEFENSE={settings.degraded_defense} reads other models; choose one "
                             "that does not (label_only, topk, round...)")
        admins = KeyRing.from_settings(settings.admin_keys, None)
        keys = KeyRing.from_settings(settings.api_keys, settings.api_keys_file)
        if not admins.open:  # an admin key is a key too
            keys = KeyRing.from_settings(",".join(filter(None, [settings.api_keys, settings.admin_keys])),
                                         settings.api_keys_file)
        budgets, limiter = make_stores(settings)
        return cls(settings, model, keys, budgets, limiter, Metrics(), settings.output_defense, params, others,
                   make_detection_store(settings), admins)

    @staticmethod
    def _shared(fn, *args):
        """A call to the budget store or rate limiter; a shared store that is down gives a 503, not a 500."""
        try:
            return fn(*args)
        except StoreUnavailable as e:
            raise ClientError(f"{e}; retry later", 503, "store_unavailable", {"Retry-After": "1"}) from None

    def identify(self, presented: str | None) -> str:
        """The caller's identity (a key id), or a 401."""
        if self.keys.open:
            return ANONYMOUS
        identity = self.keys.identify(presented)
        if identity is None:
            what = "missing API key" if presented is None else "unknown API key"
            raise ClientError(f"{what}: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'", 401,
                              "unauthorized", {"WWW-Authenticate": "Bearer"})
        return identity

    def admit(self, identity: str) -> None:
        """The rate limit: checked before the body is read, so a flood costs little."""
        wait = self._shared(self.limiter.acquire, identity)
        if wait > 0:
            raise ClientError(f"rate limit of {self.settings.rate_limit_per_s:g} requests/s exceeded; retry later",
                              429, "rate_limited", self._quota_headers(identity, wait))

    def _quota_headers(self, identity: str, retry_after: float = 0) -> dict[str, str]:
        headers = {}
        remaining = self._shared(self.budgets.remaining, identity)
        if remaining is not None:
            headers["X-Budget-Remaining"] = str(remaining)
        if retry_after:
            headers["Retry-After"] = str(max(1, int(np.ceil(retry_after))))
        return headers

    def _blocked(self, identity: str) -> ClientError:
        return ClientError("this API key is flagged as extracting the model (the service's extraction detector); "
                           "its requests are refused until an administrator clears the flag", 403,
                           "extraction_flagged")

    def _exhausted(self, n: int, remaining: int, retry_after_s: int) -> ClientError:
        return ClientError(f"image budget exhausted: {remaining} of {self.settings.budget_images} images left in "
                           f"this period, {n} asked for", 429, "budget_exhausted",
                           {"X-Budget-Remaining": str(remaining), "Retry-After": str(retry_after_s)})

    def precheck(self, identity: str, n: int) -> None:
        """Before any image of a request is decoded: refused when the key is flagged (block) or its budget cannot
        cover the n images, so an exhausted key costs no decoding. The charge itself comes after decoding (bad input
        costs nothing) and is the exact, atomic one."""
        self.check_blocked(identity)
        if self.settings.budget_images is None:
            return
        remaining = self._shared(self.budgets.remaining, identity)
        if remaining is not None and remaining < n:
            period = self.settings.budget_period_s
            raise self._exhausted(n, remaining, max(1, int(np.ceil(period - time.time() % period))))

    def check_blocked(self, identity: str) -> None:
        """Under the block policy, a flagged key is refused before its images are read or charged."""
        if self.settings.detector != "none" and self.settings.detection_policy == "block" and \
                self._shared(self.detection.flagged, identity):
            raise self._blocked(identity)

    def _detect(self, identity: str, images: np.ndarray, labels: np.ndarray):
        """The key's detector state, updated with this batch; the score in the metrics, a new flag in the log."""
        x = np.ascontiguousarray(images.reshape(len(images), -1), np.float32)
        verdict = self._shared(self.detection.update, identity, lambda st: self.detector(st, x, labels))
        if verdict.score is not None:
            self.metrics.extraction_score.labels(identity).set(verdict.score)
        if verdict.newly_flagged:
            self.metrics.extraction_flagged.inc()
            log.warning(json.dumps({"event": "extraction_flagged", "key": identity, "detector": self.settings.detector,
                                    "score": verdict.score, "policy": self.settings.detection_policy}))
        return verdict

    async def classify(self, identity: str, images: np.ndarray) -> Answer:
        """images: float32 [N, C, H, W] in [0,1], already validated. Charges N images, then answers."""
        n = len(images)
        self.check_blocked(identity)
        charge = self._shared(self.budgets.charge, identity, n)
        if not charge.allowed:
            raise self._exhausted(n, charge.remaining, charge.retry_after_s)
        try:
            raw = await self.runner.predict(images)
            others = {name: await r.predict(images) for name, r in self.other_runners.items()}
        except BaseException:
            self.budgets.refund(identity, n, charge.period)  # the server failed: the client keeps its budget
            raise
        labels = raw.argmax(1)
        flagged = False
        if self.settings.detector != "none":
            try:
                flagged = (await asyncio.to_thread(self._detect, identity, images, labels)).flagged
            except BaseException:
                self.budgets.refund(identity, n, charge.period)
                raise
            if flagged and self.settings.detection_policy == "block":
                self.budgets.refund(identity, n, charge.period)  # nothing is served
                raise self._blocked(identity)
        self.metrics.images.labels(identity).inc(n)
        if flagged and self.settings.detection_policy == "degrade":
            return Answer(self.degraded(raw), labels, charge.remaining)
        return Answer(self.defense(raw, **others), labels, charge.remaining)

    def usage(self, identity: str) -> dict:
        """What a key may know of itself: images used and left this period, and (unless disabled) its own detector
        score and flag."""
        s = self.settings
        remaining = self._shared(self.budgets.remaining, identity)
        out = {"key": identity, "budget_images": s.budget_images, "budget_remaining": remaining,
               "images_used": s.budget_images - remaining if remaining is not None else None,
               "budget_period_s": s.budget_period_s}
        if s.usage_shows_detection and s.detector != "none":
            state = self._shared(self.detection.get, identity)
            out["extraction"] = {"detector": s.detector, "score": state.get("score"),
                                 "flagged": bool(state.get("flagged")), "queries_seen": state.get("count", 0)}
        return out

    def all_usage(self) -> list[dict]:
        s = self.settings
        out = []
        for key in self._shared(self.detection.keys):
            state = self._shared(self.detection.get, key)
            out.append({"key": key, "budget_remaining": self._shared(self.budgets.remaining, key),
                        "extraction": {"detector": s.detector, "score": state.get("score"),
                                       "flagged": bool(state.get("flagged")), "queries_seen": state.get("count", 0)}})
        return out

    def clear_flag(self, key: str) -> bool:
        return self._shared(self.detection.clear_flag, key)

    def is_admin(self, presented: str | None) -> bool:
        return not self.admins.open and self.admins.identify(presented) is not None

    def describe(self) -> dict:
        s = self.settings
        return {
            "card": self.model.card.to_dict(),
            "provider": self.model.provider,
            "output_defense": {"name": self.defense_name, "params": self.defense_params,
                               "summary": DEFENSES.entry(self.defense_name).summary,
                               **({"models": {name: m.card.to_dict() for name, m in self.others.items()}}
                                  if self.others else {})},
            "micro_batching": {"enabled": s.micro_batching, "max_batch_size": s.max_batch_size,
                               "max_wait_ms": s.max_wait_ms},
            "limits": {"max_images_per_request": s.max_images_per_request, "max_body_bytes": s.max_body_bytes,
                       "max_image_pixels": s.max_image_pixels, "resize_policy": s.resize_policy,
                       "budget_images": s.budget_images, "budget_period_s": s.budget_period_s,
                       "budget_backend": s.budget_backend,
                       "rate_limit_per_s": s.rate_limit_per_s, "max_request_pixels": s.max_request_pixels,
                       "max_concurrent_decodes": s.max_concurrent_decodes, "header_timeout_s": s.header_timeout_s,
                       "body_timeout_s": s.body_timeout_s, "max_connections": s.max_connections},
            "auth": "open" if self.keys.open else "api-key",
            "detection": {"detector": s.detector, "params": self.detector_params, "policy": s.detection_policy,
                          **({"degraded_defense": s.degraded_defense} if s.detection_policy == "degrade" else {})},
        }
