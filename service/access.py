"""API keys, per-key image budgets (SQLite, exact under concurrency) and per-key rate limits."""
from __future__ import annotations

import hashlib
import hmac
import math
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ANONYMOUS = "anonymous"  # the identity budgets and rate limits use when no keys are configured


def key_id(key: str) -> str:
    """Keys are held only as SHA-256 hashes; the first 16 hex digits name a key in budgets, metrics and logs."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class KeyRing:
    def __init__(self, keys: list[str]):
        self._hashes = [hashlib.sha256(k.encode()).digest() for k in keys]

    @classmethod
    def from_settings(cls, inline: str, path: Path | None) -> "KeyRing":
        keys = [k.strip() for k in inline.split(",") if k.strip()]
        if path is not None:
            try:
                lines = Path(path).read_text().splitlines()
            except OSError as e:
                raise ValueError(f"cannot read API keys file {path}: {e.strerror}") from None
            keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        return cls(keys)

    @property
    def open(self) -> bool:
        return not self._hashes

    def identify(self, presented: str | None) -> str | None:
        """The key's id if `presented` is a configured key, else None. Compares against every key in constant
        time, so timing tells nothing about how close a guess was or which key matched."""
        if presented is None:
            return None
        digest = hashlib.sha256(presented.encode()).digest()
        match = None
        for h in self._hashes:
            if hmac.compare_digest(digest, h):
                match = h.hex()
        return match[:16] if match else None


@dataclass
class Charge:
    allowed: bool
    remaining: int | None  # images left in this period (None: no budget)
    retry_after_s: int = 0  # when refused: seconds until the period resets
    period: int = field(default=0, compare=False)  # the period charged, so a refund goes back to the same one


class BudgetStore:
    """Images used per key per period, in SQLite. One conditional UPDATE inside BEGIN IMMEDIATE makes a charge
    atomic across threads and processes: n images allowed, the n+1st refused, whatever the interleaving."""

    def __init__(self, path: Path, budget: int | None, period_s: int):
        self.path, self.budget, self.period_s = Path(path), budget, period_s
        self._local = threading.local()
        if budget is None:  # nothing to keep: no database file either
            return
        try:
            self._create()
        except sqlite3.Error as e:
            raise ValueError(f"cannot use budget database {self.path}: {e}") from None

    def _create(self) -> None:
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS usage (key_id TEXT PRIMARY KEY, period INTEGER NOT NULL, "
                       "used INTEGER NOT NULL)")

    def _connect(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    def _period(self, now: float) -> int:
        return int(now // self.period_s)

    def charge(self, key: str, n: int, now: float | None = None) -> Charge:
        if self.budget is None:
            return Charge(True, None)
        now = time.time() if now is None else now
        period = self._period(now)
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT INTO usage (key_id, period, used) VALUES (?, ?, 0) ON CONFLICT(key_id) DO UPDATE "
                       "SET used = CASE WHEN period >= excluded.period THEN used ELSE 0 END, "
                       "period = MAX(period, excluded.period)",  # a late, stale `now` never resets a newer period
                       (key, period))
            granted = db.execute("UPDATE usage SET used = used + ? WHERE key_id = ? AND used + ? <= ?",
                                 (n, key, n, self.budget)).rowcount == 1
            used = db.execute("SELECT used FROM usage WHERE key_id = ?", (key,)).fetchone()[0]
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        retry = 0 if granted else max(1, math.ceil((period + 1) * self.period_s - now))
        return Charge(granted, max(0, self.budget - used), retry, period)

    def refund(self, key: str, n: int, period: int) -> None:
        """Give back images charged (in `period`) for a request that then failed on the server's side."""
        if self.budget is not None:
            self._connect().execute("UPDATE usage SET used = MAX(used - ?, 0) WHERE key_id = ? AND period = ?",
                                    (n, key, period))

    def remaining(self, key: str, now: float | None = None) -> int | None:
        if self.budget is None:
            return None
        row = self._connect().execute("SELECT period, used FROM usage WHERE key_id = ?", (key,)).fetchone()
        now = time.time() if now is None else now
        return max(0, self.budget - (row[1] if row and row[0] == self._period(now) else 0))


class RateLimiter:
    """A token bucket per key, in memory: `rate` requests per second, bursts up to `burst`."""

    def __init__(self, rate: float | None, burst: int):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str, now: float | None = None) -> float:
        """0 if the request may go now, else the seconds until it may."""
        if self.rate is None:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.burst), now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._buckets[key] = (tokens - 1, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate
