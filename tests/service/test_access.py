"""API keys, per-key image budgets in SQLite (exact across threads and processes) and per-key rate limits."""
from __future__ import annotations

import multiprocessing
import queue
import threading
from pathlib import Path

import pytest

from service.access import BudgetStore, Charge, KeyRing, RateLimiter, key_id

KEY_A = "sk-alpha-0123456789abcdef"
KEY_B = "sk-bravo-fedcba9876543210"
KEY_C = "sk-charlie-from-the-file"


# ---------------------------------------------------------------- KeyRing

def test_keyring_from_an_inline_comma_list_ignores_blanks_and_spaces():
    ring = KeyRing.from_settings(f" {KEY_A} ,, {KEY_B},", None)
    assert not ring.open
    assert ring.identify(KEY_A) is not None
    assert ring.identify(KEY_B) is not None
    assert ring.identify("") is None
    assert ring.identify(f" {KEY_A} ") is None  # the presented key is compared as it is


def test_keyring_from_a_keys_file_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text(f"# service keys\n\n{KEY_C}\n   \n  # {KEY_B} is retired\n  {KEY_A}  \n")
    ring = KeyRing.from_settings("", path)
    assert ring.identify(KEY_C) is not None
    assert ring.identify(KEY_A) is not None  # surrounding spaces stripped
    assert ring.identify(KEY_B) is None  # only mentioned in a comment
    assert ring.identify("# service keys") is None


def test_keyring_combines_inline_keys_and_the_keys_file(tmp_path):
    path = tmp_path / "keys.txt"
    path.write_text(KEY_C + "\n")
    ring = KeyRing.from_settings(KEY_A, path)
    assert ring.identify(KEY_A) is not None and ring.identify(KEY_C) is not None
    assert ring.identify(KEY_B) is None


def test_identify_returns_a_stable_id_per_key_and_none_for_wrong_or_missing_keys():
    ring = KeyRing([KEY_A, KEY_B])
    id_a, id_b = ring.identify(KEY_A), ring.identify(KEY_B)
    assert id_a == ring.identify(KEY_A) == KeyRing([KEY_B, KEY_A]).identify(KEY_A)  # stable across instances
    assert id_a != id_b
    assert id_a == key_id(KEY_A)[:16]
    assert ring.identify(KEY_A + "x") is None
    assert ring.identify(KEY_A[:-1]) is None
    assert ring.identify("") is None
    assert ring.identify(None) is None


def test_key_ids_are_short_hex_and_do_not_contain_the_key():
    ring = KeyRing([KEY_A, KEY_B])
    for key in (KEY_A, KEY_B):
        ident = ring.identify(key)
        assert len(ident) == 16
        int(ident, 16)  # hex
        assert key not in ident and ident not in key
        assert key.split("-")[1] not in ident


def test_keyring_is_open_when_no_keys_are_configured(tmp_path):
    assert KeyRing([]).open
    assert KeyRing.from_settings("", None).open
    assert KeyRing.from_settings(" , ,", None).open
    only_comments = tmp_path / "keys.txt"
    only_comments.write_text("# none yet\n\n")
    assert KeyRing.from_settings("", only_comments).open
    assert KeyRing([]).identify(KEY_A) is None
    assert not KeyRing([KEY_A]).open


def test_an_unreadable_keys_file_raises_value_error_naming_the_path(tmp_path):
    missing = tmp_path / "no-such-keys.txt"
    with pytest.raises(ValueError, match="no-such-keys.txt"):
        KeyRing.from_settings("", missing)
    with pytest.raises(ValueError, match=str(tmp_path)):  # a directory is not a keys file either
        KeyRing.from_settings(KEY_A, tmp_path)


# ---------------------------------------------------------------- BudgetStore

T0 = 1_000_000.5  # a time inside one period of 60 s: period 16666 runs from 999_960 to 1_000_020


def test_n_images_are_allowed_and_the_next_is_refused_until_the_period_ends(tmp_path):
    store = BudgetStore(tmp_path / "b.sqlite", budget=3, period_s=60)
    results = [store.charge("k", 1, now=T0) for _ in range(3)]
    assert [c.allowed for c in results] == [True, True, True]
    assert [c.remaining for c in results] == [2, 1, 0]
    refused = store.charge("k", 1, now=T0)
    assert refused == Charge(False, 0, 20)  # the period resets at 1_000_020: ceil(19.5) = 20 s
    assert refused.retry_after_s > 0
    assert store.remaining("k", now=T0) == 0


def test_a_batch_larger_than_what_remains_is_refused_whole_and_charges_nothing(tmp_path):
    store = BudgetStore(tmp_path / "b.sqlite", budget=5, period_s=60)
    assert store.charge("k", 3, now=T0) == Charge(True, 2, 0)
    refused = store.charge("k", 3, now=T0)
    assert not refused.allowed
    assert refused.remaining == 2
    assert refused.retry_after_s > 0
    assert store.remaining("k", now=T0) == 2  # nothing charged
    assert store.charge("k", 2, now=T0) == Charge(True, 0, 0)  # what remains can still be used


def test_no_budget_always_allows_and_reports_no_remaining(tmp_path):
    store = BudgetStore(tmp_path / "b.sqlite", budget=None, period_s=60)
    for _ in range(100):
        assert store.charge("k", 1000, now=T0) == Charge(True, None)
    assert store.remaining("k") is None
    store.refund("k", 5, period=0)  # a no-op
    assert store.remaining("k") is None


def test_a_new_period_resets_the_budget(tmp_path):
    store = BudgetStore(tmp_path / "b.sqlite", budget=2, period_s=60)
    assert store.charge("k", 2, now=T0).allowed
    assert not store.charge("k", 1, now=T0 + 19).allowed  # 1_000_019.5: same period
    assert store.remaining("k", now=T0 + 19.5) == 2  # 1_000_020: a new period
    assert store.charge("k", 1, now=T0 + 19.5) == Charge(True, 1, 0)
    assert store.charge("k", 1, now=T0 + 79.5) == Charge(True, 1, 0)  # 1_000_080: and the next one


def test_a_late_charge_from_the_previous_period_does_not_reset_the_current_one(tmp_path):
    # A charge takes `now` before it waits (up to 30 s) for the database lock, so it can arrive after another
    # charge has already opened the next period. It must not wipe that period's usage (it used to: budget 2 gave 5).
    store = BudgetStore(tmp_path / "b.sqlite", budget=2, period_s=60)
    new_period, stale = 1_000_020.0, 1_000_019.9
    assert store.charge("k", 2, now=new_period).allowed
    late = store.charge("k", 1, now=stale)
    assert not late.allowed and late.remaining == 0  # counted against the newer period, which is spent
    assert not store.charge("k", 1, now=new_period).allowed
    assert store.remaining("k", now=new_period) == 0
    assert store.charge("k", 2, now=new_period + 60).allowed  # the period after that starts afresh


def test_budgets_are_kept_per_key(tmp_path):
    store = BudgetStore(tmp_path / "b.sqlite", budget=2, period_s=60)
    assert store.charge("a", 2, now=T0).allowed
    assert not store.charge("a", 1, now=T0).allowed
    assert store.charge("b", 1, now=T0) == Charge(True, 1, 0)
    assert store.remaining("c", now=T0) == 2  # never seen


def test_refund_gives_images_back_but_never_below_zero_used(tmp_path):
    store = BudgetStore(tmp_path / "b.sqlite", budget=5, period_s=3600)
    charge = store.charge("k", 4)
    assert charge.remaining == 1
    store.refund("k", 3, charge.period)
    assert store.remaining("k") == 4
    assert store.charge("k", 4).allowed
    store.refund("k", 100, charge.period)
    assert store.remaining("k") == 5
    store.refund("never-charged", 1, charge.period)  # harmless
    assert store.remaining("never-charged") == 5


def test_a_refund_goes_back_to_its_own_period_only(tmp_path):
    store = BudgetStore(tmp_path / "b.sqlite", budget=5, period_s=60)
    old = store.charge("k", 3, now=T0)
    assert store.charge("k", 5, now=T0 + 60).allowed  # the next period, all spent
    store.refund("k", 3, old.period)  # arrives late: must not give the new period images back
    assert store.remaining("k", now=T0 + 60) == 0


def test_usage_survives_a_restart_on_the_same_file(tmp_path):
    path = tmp_path / "state" / "budgets.sqlite"  # the parent folder is created
    first = BudgetStore(path, budget=10, period_s=3600)
    assert first.charge("k", 7).remaining == 3
    second = BudgetStore(path, budget=10, period_s=3600)  # the service restarted
    assert second.remaining("k") == 3
    assert not second.charge("k", 4).allowed
    assert second.charge("k", 3) == Charge(True, 0, 0)
    assert first.remaining("k") == 0  # both see one store


def test_concurrent_threads_never_overspend_the_budget(tmp_path):
    store = BudgetStore(tmp_path / "b.sqlite", budget=50, period_s=3600)
    start = threading.Barrier(16)
    allowed = []
    lock = threading.Lock()

    def client():
        start.wait()
        got = sum(store.charge("k", 1).allowed for _ in range(5))
        with lock:
            allowed.append(got)

    threads = [threading.Thread(target=client) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert len(allowed) == 16
    assert sum(allowed) == 50  # 80 asked, exactly the budget granted
    assert store.remaining("k") == 0


def _charge_from_another_process(path: str, step, results) -> None:
    """Runs in a spawned process: its own BudgetStore on the shared file, 40 charges of 1 image, each one after the
    barrier `step`, so the four processes charge in lockstep and really interleave."""
    store = BudgetStore(Path(path), budget=100, period_s=3600)
    granted = 0
    for _ in range(40):
        step.wait(timeout=60)
        granted += store.charge("k", 1).allowed
    results.put(granted)


def test_concurrent_processes_never_overspend_the_budget(tmp_path):
    path = tmp_path / "b.sqlite"
    BudgetStore(path, budget=100, period_s=3600)  # as the service would: the file exists before workers start
    ctx = multiprocessing.get_context("spawn")
    step = ctx.Barrier(4)
    results = ctx.Queue()
    workers = [ctx.Process(target=_charge_from_another_process, args=(str(path), step, results))
               for _ in range(4)]
    for w in workers:
        w.start()
    try:
        counts = [results.get(timeout=120) for _ in workers]
    except queue.Empty:
        pytest.fail("a worker process did not report")
    finally:
        for w in workers:
            w.join(timeout=60)
            if w.is_alive():
                w.kill()
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    assert sum(counts) == 100, counts  # 160 asked, exactly the budget granted
    assert BudgetStore(path, budget=100, period_s=3600).remaining("k") == 0


# ---------------------------------------------------------------- RateLimiter

def test_a_burst_is_allowed_then_the_next_request_must_wait():
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.acquire("k", now=100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.acquire("k", now=100.0)
    assert wait > 0
    assert wait == pytest.approx(0.5)  # one token at 2 per second


def test_tokens_refill_at_the_rate_up_to_the_burst():
    limiter = RateLimiter(rate=2.0, burst=3)
    for _ in range(3):
        limiter.acquire("k", now=0.0)
    assert limiter.acquire("k", now=0.25) == pytest.approx(0.25)  # half a token back, half to go
    assert limiter.acquire("k", now=0.5) == 0.0  # one token back after 0.5 s
    assert limiter.acquire("k", now=0.5) == pytest.approx(0.5)
    assert limiter.acquire("k", now=1.5) == 0.0  # two tokens back after 1 s
    assert limiter.acquire("k", now=1.5) == 0.0
    assert limiter.acquire("k", now=1.5) > 0
    # a long idle time refills only up to the burst
    assert [limiter.acquire("k", now=1000.0) for _ in range(4)][:3] == [0.0, 0.0, 0.0]
    assert limiter.acquire("k", now=1000.0) > 0


def test_no_rate_never_limits():
    limiter = RateLimiter(rate=None, burst=1)
    assert all(limiter.acquire("k", now=0.0) == 0.0 for _ in range(1000))
    assert limiter.acquire("k") == 0.0


def test_rate_limits_are_kept_per_key():
    limiter = RateLimiter(rate=1.0, burst=2)
    assert limiter.acquire("a", now=0.0) == 0.0
    assert limiter.acquire("a", now=0.0) == 0.0
    assert limiter.acquire("a", now=0.0) > 0
    assert limiter.acquire("b", now=0.0) == 0.0  # a's flood does not touch b
    assert limiter.acquire("b", now=0.0) == 0.0
    assert limiter.acquire("b", now=0.0) > 0


def test_rate_limiter_is_exact_across_threads():
    limiter = RateLimiter(rate=0.001, burst=20)  # effectively no refill during the test
    start = threading.Barrier(8)
    granted = []
    lock = threading.Lock()

    def client():
        start.wait()
        got = sum(limiter.acquire("k", now=0.0) == 0.0 for _ in range(10))
        with lock:
            granted.append(got)

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sum(granted) == 20


def test_without_a_budget_no_database_file_is_created(tmp_path):
    store = BudgetStore(tmp_path / "b.sqlite", budget=None, period_s=60)
    assert store.charge("k", 5).allowed and store.remaining("k") is None
    assert not (tmp_path / "b.sqlite").exists()
