"""The Redis budget backend: exact budgets and shared rate limits across two real service processes."""
import asyncio
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import serve
from helpers import digits_test_images, files, png
from service.access import RedisBudgetStore, RedisRateLimiter
from service.process import free_port

IMG = png(digits_test_images(1)[0])


@pytest.fixture(scope="module")
def redis_url():
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run installs it)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    import redis
    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(10)


def test_a_charge_is_atomic_across_threads(redis_url):
    store = RedisBudgetStore(redis_url, budget=100, period_s=3600, prefix="t1:")
    with ThreadPoolExecutor(8) as pool:
        granted = list(pool.map(lambda _: store.charge("k", 1).allowed, range(160)))
    assert granted.count(True) == 100
    assert store.remaining("k") == 0
    refused = store.charge("k", 1)
    assert not refused.allowed and refused.remaining == 0 and refused.retry_after_s > 0


def test_periods_refunds_and_keys_are_separate(redis_url):
    store = RedisBudgetStore(redis_url, budget=10, period_s=100, prefix="t2:")
    first = store.charge("a", 7, now=1000.0)
    assert first.allowed and first.remaining == 3
    assert not store.charge("a", 4, now=1050.0).allowed  # same period: only 3 left
    store.refund("a", 2, first.period)
    assert store.remaining("a", now=1050.0) == 5
    assert store.charge("a", 10, now=1100.0).allowed  # a new period starts afresh
    assert store.remaining("b", now=1050.0) == 10  # per key


def test_the_rate_limit_bucket_is_shared(redis_url):
    one, other = (RedisRateLimiter(redis_url, rate=1.0, burst=3, prefix="t3:") for _ in range(2))
    waits = [lim.acquire("k", now=500.0) for lim in (one, other, one, other)]
    assert waits[:3] == [0.0, 0.0, 0.0] and waits[3] == pytest.approx(1.0)
    assert one.acquire("k", now=501.0) == 0.0  # a token came back after a second


def test_an_unreachable_redis_is_a_clear_start_up_error():
    with pytest.raises(ValueError, match="cannot reach Redis"):
        RedisBudgetStore(f"redis://127.0.0.1:{free_port()}/0", budget=5, period_s=60)


async def _spread(urls, n, key):
    async with httpx.AsyncClient(timeout=30) as client:
        return await asyncio.gather(*[client.post(urls[i % len(urls)] + "/predict", files=files([IMG]),
                                                  headers={"X-API-Key": key}) for i in range(n)])


def test_budgets_and_rate_limits_hold_across_two_service_processes(digits_run, redis_url, tmp_path):
    common = ("--api-keys", "k1,k2", "--budget-backend", "redis", "--redis-url", redis_url,
              "--redis-prefix", "svc:", "--budget-images", "15")
    model = digits_run[0] / "model.onnx"
    with serve(model, *common) as a, serve(model, *common) as b:
        results = asyncio.run(_spread([a.url, b.url], 24, "k1"))  # 24 racing for 15, over two replicas
        assert sorted(r.status_code for r in results) == [200] * 15 + [429] * 9
        assert {r.json()["reason"] for r in results if r.status_code == 429} == {"budget_exhausted"}
        for s in (a, b):  # both replicas see the same spent budget
            r = httpx.post(s.url + "/predict", files=files([IMG]), headers={"X-API-Key": "k1"})
            assert r.status_code == 429 and r.headers["x-budget-remaining"] == "0"
        assert httpx.post(a.url + "/predict", files=files([IMG]), headers={"X-API-Key": "k2"}
                          ).headers["x-budget-remaining"] == "14"
        assert httpx.get(a.url + "/v1/model", headers={"X-API-Key": "k2"}).json()["limits"]["budget_backend"] == "redis"
    limited = ("--budget-backend", "redis", "--redis-url", redis_url, "--redis-prefix", "rl:",
               "--rate-limit-per-s", "0.01", "--rate-limit-burst", "5")
    with serve(model, *limited) as a, serve(model, *limited) as b:
        results = asyncio.run(_spread([a.url, b.url], 10, "any"))
        codes = sorted(r.status_code for r in results)
        assert codes == [200] * 5 + [429] * 5  # one bucket of 5 for the key, whichever replica answers


def test_a_redis_that_goes_away_gives_503_not_500(digits_run):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run installs it)")
    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind",
                             "127.0.0.1", "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        import redis
        for _ in range(100):
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        with serve(digits_run[0] / "model.onnx", "--budget-backend", "redis", "--redis-url", url,
                   "--budget-images", "5") as s:
            assert httpx.post(s.url + "/predict", files=files([IMG])).status_code == 200
            proc.terminate()
            proc.wait(10)
            r = httpx.post(s.url + "/predict", files=files([IMG]))
            assert r.status_code == 503 and r.json()["reason"] == "store_unavailable"
            assert "Redis" in r.json()["detail"] and r.headers["retry-after"] == "1"
    finally:
        proc.kill()


def test_the_detection_state_is_one_per_key_across_two_replicas(digits_run, redis_url):
    """Each key's detector state lives in Redis: updates racing over two replicas are all counted (the per-key
    lock), a key flagged through one replica is refused by the other, and another key is untouched."""
    model = digits_run[0] / "model.onnx"
    common = ("--api-keys", "thief,honest", "--budget-backend", "redis", "--redis-url", redis_url,
              "--redis-prefix", "det:", "--detector", "knn", "--detector-k", "2", "--detector-window", "1",
              "--detection-policy", "block")
    with serve(model, *common, "--detector-threshold", "0") as a, serve(model, *common, "--detector-threshold",
                                                                           "0") as b:
        results = asyncio.run(_spread([a.url, b.url], 12, "honest"))
        assert [r.status_code for r in results] == [200] * 12
        seen = httpx.get(b.url + "/v1/usage", headers={"X-API-Key": "honest"}).json()["extraction"]["queries_seen"]
        assert seen == 12  # no update lost between the replicas
    # Now a threshold above any distance: the first scored query (a key's third) flags it.
    with serve(model, *common, "--detector-threshold", "1e6") as a, serve(model, *common, "--detector-threshold",
                                                                             "1e6") as b:
        two = [png(i) for i in digits_test_images(2)]
        assert httpx.post(a.url + "/predict", files=files(two), headers={"X-API-Key": "thief"}).status_code == 200
        r = httpx.post(b.url + "/predict", files=files([IMG]), headers={"X-API-Key": "thief"})
        assert r.status_code == 403 and r.json()["reason"] == "extraction_flagged"  # b scored a's two queries
        assert httpx.post(a.url + "/predict", files=files([IMG]), headers={"X-API-Key": "thief"}).status_code == 403
        assert httpx.get(a.url + "/v1/usage", headers={"X-API-Key": "honest"}).json()["extraction"]["flagged"] is False
