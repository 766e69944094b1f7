"""API keys, per-key image budgets and per-key rate limits.

Budgets live in SQLite (one process, or several on one host sharing the file) or in Redis (replicas on many
hosts: budgets and rate limits then hold across all of them). Both are exact under concurrency.
"""
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


def thread_connection(local: threading.local, path: Path) -> sqlite3.Connection:
    """This thread's connection to the SQLite file (autocommit: the callers use explicit transactions)."""
    db = getattr(local, "db", None)
    if db is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=30, isolation_level=None)
        db.execute("PRAGMA synchronous=NORMAL")
        local.db = db
    return db


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
        return thread_connection(self._local, self.path)

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


class StoreUnavailable(RuntimeError):
    """The shared store (Redis) did not answer: the request is refused with a 503, and nothing is charged."""


# One script per operation: Redis runs each atomically, so replicas never interleave inside a charge.
_CHARGE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local n, budget = tonumber(ARGV[1]), tonumber(ARGV[2])
if used + n <= budget then
  used = redis.call('INCRBY', KEYS[1], n)
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return {1, used}
end
return {0, used}
"""
_REFUND = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local n = math.min(used, tonumber(ARGV[1]))
if n > 0 then redis.call('DECRBY', KEYS[1], n) end
return n
"""
_BUCKET = """
local b = redis.call('HMGET', KEYS[1], 'tokens', 'last')
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens = tonumber(b[1]) or burst
local last = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - last) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'last', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return tostring(wait)
"""


def _redis(url: str):
    try:
        import redis
    except ImportError:
        raise ValueError("ASTGUARD_BUDGET_BACKEND=redis needs the redis package (pip install redis)") from None
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as e:
        raise ValueError(f"cannot reach Redis at {url}: {e}") from None
    return client


class _RedisCalls:
    """Runs the scripts, turning a Redis failure into StoreUnavailable."""

    def __init__(self, url: str, prefix: str):
        self.client, self.prefix = _redis(url), prefix
        self.scripts = {name: self.client.register_script(src)
                        for name, src in (("charge", _CHARGE), ("refund", _REFUND), ("bucket", _BUCKET))}

    def __call__(self, name: str, keys: list[str], args: list):
        import redis
        try:
            if name == "get":
                return self.client.get(keys[0])
            return self.scripts[name](keys=keys, args=args)
        except redis.RedisError as e:
            raise StoreUnavailable(f"the budget store (Redis) is unavailable: {e}") from None


class RedisBudgetStore(BudgetStore):
    """Images used per key per period, in Redis, shared by every replica. The period is part of the Redis key,
    which expires two periods later; a charge is one atomic script: n images allowed, the n+1st refused."""

    def __init__(self, url: str, budget: int | None, period_s: int, prefix: str = "astguard:"):
        self.budget, self.period_s = budget, period_s
        self._call = _RedisCalls(url, prefix) if budget is not None else None

    def _key(self, key: str, period: int) -> str:
        return f"{self._call.prefix}budget:{key}:{period}"

    def charge(self, key: str, n: int, now: float | None = None) -> Charge:
        if self.budget is None:
            return Charge(True, None)
        now = time.time() if now is None else now
        period = self._period(now)
        granted, used = self._call("charge", [self._key(key, period)], [n, self.budget, 2 * self.period_s])
        retry = 0 if granted else max(1, math.ceil((period + 1) * self.period_s - now))
        return Charge(bool(granted), max(0, self.budget - int(used)), retry, period)

    def refund(self, key: str, n: int, period: int) -> None:
        if self.budget is not None:
            self._call("refund", [self._key(key, period)], [n])

    def remaining(self, key: str, now: float | None = None) -> int | None:
        if self.budget is None:
            return None
        now = time.time() if now is None else now
        used = self._call("get", [self._key(key, self._period(now))], [])
        return max(0, self.budget - int(used or 0))


class RedisRateLimiter(RateLimiter):
    """The token bucket of RateLimiter, kept in Redis so that a key's rate holds across replicas. Time is the
    callers' wall clock (replicas are expected to keep theirs in sync, as NTP does)."""

    def __init__(self, url: str, rate: float | None, burst: int, prefix: str = "astguard:"):
        super().__init__(rate, burst)
        self._call = _RedisCalls(url, prefix) if rate is not None else None

    def acquire(self, key: str, now: float | None = None) -> float:
        if self.rate is None:
            return 0.0
        now = time.time() if now is None else now
        return float(self._call("bucket", [f"{self._call.prefix}rate:{key}"], [self.rate, self.burst, now]))


def make_stores(settings) -> tuple[BudgetStore, RateLimiter]:
    """The budget store and rate limiter the settings ask for (ASTGUARD_BUDGET_BACKEND)."""
    if settings.budget_backend == "redis":
        return (RedisBudgetStore(settings.redis_url, settings.budget_images, settings.budget_period_s,
                                 settings.redis_prefix),
                RedisRateLimiter(settings.redis_url, settings.rate_limit_per_s, settings.rate_limit_burst,
                                 settings.redis_prefix))
    return (BudgetStore(settings.budget_db, settings.budget_images, settings.budget_period_s),
            RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst))
