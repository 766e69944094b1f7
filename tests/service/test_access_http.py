"""API keys, per-key image budgets (exact under concurrency, kept across a restart) and rate limits."""
import asyncio

import httpx
import pytest

from conftest import serve
from helpers import digits_test_images, files, png

IMG = png(digits_test_images(1)[0])


def predict(url, key=None, n=1, header="bearer"):
    headers = {} if key is None else ({"Authorization": f"Bearer {key}"} if header == "bearer" else {"X-API-Key": key})
    return httpx.post(url + "/predict", files=files([IMG] * n), headers=headers)


def test_keys_are_required_and_health_and_metrics_stay_open(digits_run, tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\nfile-key\n\n")
    with serve(digits_run[0] / "model.onnx", "--api-keys", "alpha,beta", "--api-keys-file", str(keys_file),
               "--budget-db", str(tmp_path / "b.sqlite")) as s:
        missing = predict(s.url)
        assert missing.status_code == 401 and "missing API key" in missing.json()["detail"]
        assert missing.headers["www-authenticate"] == "Bearer"
        assert predict(s.url, "wrong").status_code == 401
        assert predict(s.url, "alpha").status_code == 200
        assert predict(s.url, "beta", header="x-api-key").status_code == 200
        assert predict(s.url, "file-key").status_code == 200
        assert httpx.get(s.url + "/v1/model").status_code == 401
        assert httpx.get(s.url + "/v1/model", headers={"X-API-Key": "alpha"}).json()["auth"] == "api-key"
        assert httpx.get(s.url + "/v2/health/ready").status_code == 200
        assert httpx.get(s.url + "/v2/health/live").status_code == 200
        assert httpx.get(s.url + "/metrics").status_code == 200
        assert "alpha" not in httpx.get(s.url + "/metrics").text  # keys are never shown, only hash prefixes


async def _race(url, key, n):
    async with httpx.AsyncClient(timeout=30) as client:
        return await asyncio.gather(*[client.post(url + "/predict", files=files([IMG]),
                                                  headers={"X-API-Key": key}) for _ in range(n)])


def test_a_budget_allows_exactly_n_images_under_concurrency_and_survives_a_restart(digits_run, tmp_path):
    args = ("--api-keys", "k1,k2", "--budget-images", "10", "--budget-db", str(tmp_path / "budgets.sqlite"))
    with serve(digits_run[0] / "model.onnx", *args) as s:
        ok = predict(s.url, "k1", n=3)
        assert ok.status_code == 200 and ok.headers["x-budget-remaining"] == "7"
        results = asyncio.run(_race(s.url, "k1", 12))  # 12 racing for the last 7
        codes = sorted(r.status_code for r in results)
        assert codes == [200] * 7 + [429] * 5
        refused = next(r for r in results if r.status_code == 429)
        assert refused.headers["x-budget-remaining"] == "0" and int(refused.headers["retry-after"]) > 0
        assert "budget" in refused.json()["detail"]
        assert s.metric("astguard_rejections_total", reason="budget_exhausted") == 5
        assert predict(s.url, "k2", n=2).headers["x-budget-remaining"] == "8"  # budgets are per key
    with serve(digits_run[0] / "model.onnx", *args) as s:  # a restart keeps what was spent
        again = predict(s.url, "k1")
        assert again.status_code == 429 and again.headers["x-budget-remaining"] == "0"
        assert predict(s.url, "k2", n=8).status_code == 200
        assert predict(s.url, "k2").status_code == 429


def test_a_request_bigger_than_what_is_left_is_refused_whole_and_costs_nothing(digits_run, tmp_path):
    with serve(digits_run[0] / "model.onnx", "--api-keys", "k", "--budget-images", "5",
               "--budget-db", str(tmp_path / "b.sqlite")) as s:
        assert predict(s.url, "k", n=4).status_code == 200
        assert predict(s.url, "k", n=2).status_code == 429
        assert predict(s.url, "k", n=1).headers["x-budget-remaining"] == "0"


def test_bad_input_costs_no_budget(digits_run, tmp_path):
    with serve(digits_run[0] / "model.onnx", "--api-keys", "k", "--budget-images", "2",
               "--budget-db", str(tmp_path / "b.sqlite")) as s:
        bad = httpx.post(s.url + "/predict", files=[("files", ("x.png", b"junk", "image/png"))],
                         headers={"X-API-Key": "k"})
        assert bad.status_code == 400
        assert predict(s.url, "k", n=2).status_code == 200


def test_the_rate_limit_answers_429_with_retry_after(digits_run, tmp_path):
    with serve(digits_run[0] / "model.onnx", "--rate-limit-per-s", "0.5", "--rate-limit-burst", "2",
               "--budget-db", str(tmp_path / "b.sqlite")) as s:
        assert [predict(s.url).status_code for _ in range(2)] == [200, 200]
        limited = predict(s.url)
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert "rate limit" in limited.json()["detail"]


def test_keys_are_checked_before_a_v2_body_is_parsed_and_model_readiness_needs_a_key(digits_run, tmp_path):
    with serve(digits_run[0] / "model.onnx", "--api-keys", "k", "--budget-db", str(tmp_path / "b.sqlite")) as s:
        r = httpx.post(s.url + "/v2/models/digits-ast/infer", content=b"{{{ not json",
                       headers={"content-type": "application/json"})
        assert r.status_code == 401
        assert httpx.get(s.url + "/v2/models/digits-ast/ready").status_code == 401
        ready = httpx.get(s.url + "/v2/models/digits-ast/ready", headers={"X-API-Key": "k"})
        assert ready.status_code == 200
