"""Extraction detection per API key: the service notices a key that is distilling the model while it does.

A detector (registry DETECTORS, `ASTGUARD_DETECTOR`) is a pure function of a key's state and a batch of its
queries (the model's input pixels, flattened, and the model's own top-1 labels) that returns the new state, a score
and whether the key is flagged. The state is bounded per key (oldest entries dropped) and is kept in a store
(`DetectionStore`): SQLite on one host (the budgets' backend; it survives a restart), Redis for replicas (shared:
each update is a read-modify-write under a per-key lock). numpy only: no torch in the serving path.

- `prada` (Juuti et al., EuroS&P 2019): per predicted class, a growing set of past queries. Each query's minimum L2
  distance to its class's set joins the key's distances; the query joins the set when that distance exceeds the
  class's threshold max(T, mean - std of the set's distances). Every `check_every` queries, once more than
  `min_distances` distances remain after dropping those beyond 3 sigma, the key is flagged when their Shapiro-Wilk
  statistic W is below delta. The authors' code (growing_set.py) keeps one state for every client and computes
  distances on uint8 (wrapping around); here each key has its own state and distances are float.
- `knn` (Chen, Carlini & Wagner 2019, "Stateful Detection of Black-Box Adversarial Attacks"): each query's mean L2
  distance to its K nearest earlier queries of the key (a bounded buffer); the score is the mean of the last W such
  distances, and the key is flagged when it falls below a threshold calibrated on benign traffic (the 0.1st
  percentile: `python -m evaluation.calibrate_detector`). Queries that are much closer to each other than a
  benign user's are the signature of a thief exploring around its own samples.
"""
from __future__ import annotations

import io
import json
import math
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Callable

import numpy as np

from astguard.registry import Registry
from service.access import thread_connection


@dataclass
class Verdict:
    score: float | None  # the detector's statistic after this batch (None until it has enough queries)
    flagged: bool  # the key is flagged (it stays flagged until an admin clears it)
    newly_flagged: bool = False  # this batch flagged it


# ---------------------------------------------------------------- Shapiro-Wilk W (Royston 1992), numpy only

def shapiro_w(x: np.ndarray) -> float:
    """The Shapiro-Wilk statistic W of a sample (3 <= n <= 5000), with Royston's (1992) approximation of the
    coefficients, as scipy.stats.shapiro computes it; 1 for a sample with no spread."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    n = len(x)
    if n < 3:
        raise ValueError("Shapiro-Wilk needs at least 3 values")
    ss = float(((x - x.mean()) ** 2).sum())
    if ss <= 0:
        return 1.0
    if n == 3:
        a = np.array([-math.sqrt(0.5), 0.0, math.sqrt(0.5)])
    else:
        inv = NormalDist().inv_cdf
        m = np.array([inv((i - 0.375) / (n + 0.25)) for i in range(1, n + 1)])
        c = m / math.sqrt(float(m @ m))
        u = 1 / math.sqrt(n)
        an = c[-1] + 0.221157 * u - 0.147981 * u ** 2 - 2.071190 * u ** 3 + 4.434685 * u ** 4 - 2.706056 * u ** 5
        if n > 5:
            an1 = c[-2] + 0.042981 * u - 0.293762 * u ** 2 - 1.752461 * u ** 3 + 5.682633 * u ** 4 \
                - 3.582633 * u ** 5
            phi = (float(m @ m) - 2 * m[-1] ** 2 - 2 * m[-2] ** 2) / (1 - 2 * an ** 2 - 2 * an1 ** 2)
            a = m / math.sqrt(phi)
            a[-1], a[-2], a[0], a[1] = an, an1, -an, -an1
        else:
            phi = (float(m @ m) - 2 * m[-1] ** 2) / (1 - 2 * an ** 2)
            a = m / math.sqrt(phi)
            a[-1], a[0] = an, -an
    return float(min(1.0, (a @ x) ** 2 / ss))


# ---------------------------------------------------------------- detectors

def _min_dist(x: np.ndarray, points: np.ndarray) -> float:
    return float(np.sqrt(((points.astype(np.float32) - x) ** 2).sum(1)).min())


def prada(state: dict, x: np.ndarray, labels: np.ndarray, *, delta: float = 0.9, check_every: int = 10,
          min_distances: int = 100, set_cap: int = 100, distances_cap: int = 2000) -> tuple[dict, Verdict]:
    """One batch of a key's queries (float32 [n, D], top-1 labels [n]) through PRADA; the state holds the growing sets
    (at most `set_cap` vectors per class, oldest dropped), their distances, the thresholds and the key's distances
    (at most `distances_cap`)."""
    sets = state.setdefault("sets", {})  # class -> float16 [m, D]
    set_dists = state.setdefault("set_dists", {})  # class -> float32 [m]
    thresholds = state.setdefault("thresholds", {})  # class -> float
    dists = state.get("dists", np.zeros(0, np.float32))
    count, flagged, score = state.get("count", 0), state.get("flagged", False), state.get("score")
    newly = False
    for xi, c in zip(x, labels.tolist()):
        c = str(c)
        if c not in sets or len(sets[c]) == 0:
            sets[c], set_dists[c] = xi[None].astype(np.float16), np.zeros(1, np.float32)
            thresholds.setdefault(c, 0.0)
        else:
            d = _min_dist(xi, sets[c])
            dists = np.append(dists, np.float32(d))[-distances_cap:]
            thresholds[c] = max(thresholds[c], float(set_dists[c].mean() - set_dists[c].std()))
            if d > thresholds[c]:
                sets[c] = np.concatenate([sets[c], xi[None].astype(np.float16)])[-set_cap:]
                set_dists[c] = np.append(set_dists[c], np.float32(d))[-set_cap:]
        count += 1
        if count % check_every == 0 and len(dists) > 0:
            kept = dists[np.abs(dists - dists.mean()) <= 3 * dists.std()] if dists.std() > 0 else dists
            if len(kept) > min_distances:
                score = shapiro_w(kept)
                if score < delta and not flagged:
                    flagged = newly = True
    state.update(dists=dists, count=count, flagged=flagged, score=score)
    return state, Verdict(score, flagged, newly)


def knn(state: dict, x: np.ndarray, labels: np.ndarray, *, k: int = 50, window: int = 50, buffer: int = 1000,
        threshold: float = 0.0) -> tuple[dict, Verdict]:
    """One batch through the kNN detector; the state holds the last `buffer` queries (float16) and the last `window`
    per-query kNN distances. The score is their mean; below `threshold`, the key is flagged."""
    buf = state.get("buffer")
    recent = state.get("recent", np.zeros(0, np.float32))
    count, flagged, score = state.get("count", 0), state.get("flagged", False), state.get("score")
    newly = False
    for xi in x:
        if buf is not None and len(buf) >= k:
            d = np.sqrt(((buf.astype(np.float32) - xi) ** 2).sum(1))
            recent = np.append(recent, np.float32(np.partition(d, k - 1)[:k].mean()))[-window:]
            if len(recent) >= window:
                score = float(recent.mean())
                if score < threshold and not flagged:
                    flagged = newly = True
        buf = xi[None].astype(np.float16) if buf is None else np.concatenate([buf, xi[None].astype(np.float16)])[
            -buffer:]
        count += 1
    state.update(buffer=buf, recent=recent, count=count, flagged=flagged, score=score)
    return state, Verdict(score, flagged, newly)


def no_detector(state: dict, x: np.ndarray, labels: np.ndarray) -> tuple[dict, Verdict]:
    state["count"] = state.get("count", 0) + len(x)
    return state, Verdict(None, False)


DETECTORS: Registry[Callable] = Registry("detector")
DETECTORS.register("none", no_detector, summary="no detection")
DETECTORS.register("prada", prada, params=("delta", "check_every", "min_distances", "set_cap", "distances_cap"),
                   summary="Juuti et al. 2019: Shapiro-Wilk normality of the minimum distances to per-class growing "
                           "sets; a thief's synthetic queries are not normally spread",
                   memory="per key: set_cap x classes queries (float16) + distances_cap distances")
DETECTORS.register("knn", knn, params=("k", "window", "buffer", "threshold"),
                   summary="Chen, Carlini & Wagner 2019: the mean distance of each query to its K nearest earlier "
                           "queries, averaged over a window, below a threshold calibrated on benign traffic",
                   memory="per key: buffer queries (float16) + window distances")


def bind_detector(name: str, **settings) -> tuple[Callable, dict]:
    """The detector bound to its parameters (settings `detector_<param>`); returns (fn(state, x, labels), params)."""
    entry = DETECTORS.entry(name)
    params = {p: settings[p] for p in entry.params}
    return (lambda state, x, labels: entry.value(state, x, labels, **params)), params


# ---------------------------------------------------------------- state, serialised

def dump_state(state: dict) -> bytes:
    """A key's state as bytes (npz: arrays as they are, the rest as JSON)."""
    arrays, meta = {}, {}
    for k, v in state.items():
        if isinstance(v, np.ndarray):
            arrays[k] = v
        elif isinstance(v, dict) and v and all(isinstance(a, np.ndarray) for a in v.values()):
            for c, a in v.items():
                arrays[f"{k}/{c}"] = a
        else:
            meta[k] = v
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    return buf.getvalue()


def load_state(blob: bytes | None) -> dict:
    if not blob:
        return {}
    z = np.load(io.BytesIO(blob), allow_pickle=False)
    state = json.loads(z["__meta__"].tobytes().decode())
    for name in z.files:
        if name == "__meta__":
            continue
        if "/" in name:
            group, c = name.split("/", 1)
            state.setdefault(group, {})[c] = z[name]
        else:
            state[name] = z[name]
    return state


class DetectionStore:
    """Each key's state, updated atomically. In memory (one process; tests), in SQLite (one host: every process
    of it; survives a restart), or in Redis (every replica)."""

    def update(self, key: str, fn: Callable[[dict], tuple[dict, Verdict]]) -> Verdict:
        raise NotImplementedError

    def get(self, key: str) -> dict:
        raise NotImplementedError

    def flagged(self, key: str) -> bool:
        """Whether the key is flagged, without reading its whole state (checked before every request)."""
        return bool(self.get(key).get("flagged", False))

    def keys(self) -> list[str]:
        raise NotImplementedError

    def clear_flag(self, key: str) -> bool:
        def clear(state):
            was = state.get("flagged", False)
            state["flagged"] = False
            return state, Verdict(state.get("score"), False, was)
        return self.update(key, clear).newly_flagged


class MemoryDetectionStore(DetectionStore):
    def __init__(self):
        self._states: dict[str, dict] = {}
        self._lock = threading.Lock()

    def update(self, key, fn):
        with self._lock:
            state, verdict = fn(self._states.get(key, {}))
            self._states[key] = state
            return verdict

    def get(self, key):
        with self._lock:
            return dict(self._states.get(key, {}))

    def keys(self):
        with self._lock:
            return sorted(self._states)


class SQLiteDetectionStore(DetectionStore):
    """One row per key: its state, read, updated and written inside BEGIN IMMEDIATE, so processes sharing the file
    take turns and a restart finds every state as it was."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._local = threading.local()
        try:
            db = self._connect()
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS detection (key_id TEXT PRIMARY KEY, state BLOB NOT NULL, "
                       "flagged INTEGER NOT NULL DEFAULT 0, updated REAL NOT NULL)")
        except (sqlite3.Error, OSError) as e:
            raise ValueError(f"cannot use detection database {self.path}: {e}") from None

    def _connect(self) -> sqlite3.Connection:
        return thread_connection(self._local, self.path)

    def update(self, key, fn):
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT state FROM detection WHERE key_id = ?", (key,)).fetchone()
            state, verdict = fn(load_state(row[0] if row else None))
            db.execute("INSERT INTO detection (key_id, state, flagged, updated) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT(key_id) DO UPDATE SET state = excluded.state, flagged = excluded.flagged, "
                       "updated = excluded.updated",
                       (key, dump_state(state), int(bool(state.get("flagged"))), time.time()))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return verdict

    def get(self, key):
        row = self._connect().execute("SELECT state FROM detection WHERE key_id = ?", (key,)).fetchone()
        return load_state(row[0] if row else None)

    def keys(self):
        return [r[0] for r in self._connect().execute("SELECT key_id FROM detection ORDER BY key_id")]

    def flagged(self, key):
        row = self._connect().execute("SELECT flagged FROM detection WHERE key_id = ?", (key,)).fetchone()
        return bool(row and row[0])


class RedisDetectionStore(DetectionStore):
    """Each key's state in Redis, shared by every replica: an update takes the key's lock (SET NX with an expiry, so
    a replica that dies frees it), reads, computes, writes, and releases it."""

    def __init__(self, url: str, prefix: str = "astguard:"):
        from service.access import _redis

        self.client, self.prefix = _redis(url), prefix

    def _key(self, key: str) -> str:
        return f"{self.prefix}detect:{key}"

    def update(self, key, fn):
        import redis

        from service.access import StoreUnavailable

        lock = self.client.lock(self._key(key) + ":lock", timeout=10, blocking_timeout=10)
        try:
            with lock:
                state, verdict = fn(load_state(self.client.get(self._key(key))))
                self.client.set(self._key(key), dump_state(state))
                self.client.set(self._key(key) + ":flagged", int(bool(state.get("flagged"))))
            return verdict
        except redis.RedisError as e:
            raise StoreUnavailable(f"the detection store (Redis) is unavailable: {e}") from None

    def get(self, key):
        return load_state(self._call(self.client.get, self._key(key)))

    def flagged(self, key):
        return self._call(self.client.get, self._key(key) + ":flagged") == b"1"

    def keys(self):
        prefix = self._key("")
        return sorted(k.decode()[len(prefix):] for k in self._call(lambda: list(self.client.scan_iter(prefix + "*")))
                      if not k.decode().endswith((":lock", ":flagged")))

    @staticmethod
    def _call(fn, *args):
        import redis

        from service.access import StoreUnavailable
        try:
            return fn(*args)
        except redis.RedisError as e:
            raise StoreUnavailable(f"the detection store (Redis) is unavailable: {e}") from None


def make_detection_store(settings) -> DetectionStore:
    if settings.detector == "none":
        return MemoryDetectionStore()
    if settings.budget_backend == "redis":
        return RedisDetectionStore(settings.redis_url, settings.redis_prefix)
    return SQLiteDetectionStore(settings.detection_db)
