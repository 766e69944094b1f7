"""Extraction detection (service/detection.py): each detector's statistics by hand on tiny streams, keys that never
share state, the stores, and the policies through the real server."""
from __future__ import annotations

import math
import subprocess
import sys

import httpx
import numpy as np
import pytest

from conftest import REPO, serve
from helpers import digits_test_images, files, png
from service.access import key_id
from service.detection import (MemoryDetectionStore, SQLiteDetectionStore, dump_state, knn, load_state, prada,
                               shapiro_w)


def test_shapiro_w_by_hand_for_three_values_and_against_scipy():
    # n = 3: a = (-1/sqrt2, 0, 1/sqrt2), so W = (x3 - x1)^2 / 2 / sum (x - mean)^2. For (0, 1, 3): 9/2 / (14/3).
    assert shapiro_w(np.array([3.0, 0.0, 1.0])) == pytest.approx(4.5 / (14 / 3))
    assert shapiro_w(np.ones(10)) == 1.0
    scipy = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for x in (rng.normal(size=150), rng.exponential(size=150), rng.uniform(size=40)):
        assert shapiro_w(x) == pytest.approx(scipy.shapiro(x).statistic, abs=2e-4)


def test_knn_scores_the_mean_distance_to_the_k_nearest_earlier_queries():
    # Points on a line at 0, 1, 2, 3: with k = 2 and a window of 1, the query at 3 is scored by its two nearest
    # earlier points (2 and 1): (1 + 2) / 2 = 1.5; then a query at 10: (7 + 8) / 2 = 7.5.
    x = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]], np.float32)
    state, verdicts = {}, []
    for row in x:
        state, v = knn(state, row[None], np.zeros(1, int), k=2, window=1, buffer=10, threshold=1.6)
        verdicts.append(v)
    assert [v.score for v in verdicts] == [None, None, pytest.approx(1.5), pytest.approx(1.5), pytest.approx(7.5)]
    # At 2 the score is (1 + 2)/2 = 1.5 too, below the threshold 1.6: the key is flagged, and stays flagged.
    assert verdicts[2].flagged and verdicts[2].newly_flagged and verdicts[4].flagged and not verdicts[4].newly_flagged


def test_knn_keeps_a_bounded_buffer_and_a_window_average():
    state = {}
    for i in range(12):
        state, v = knn(state, np.array([[float(i)]], np.float32), np.zeros(1, int), k=1, window=3, buffer=4,
                       threshold=0.0)
    assert len(state["buffer"]) == 4 and state["buffer"][0, 0] == 8  # the oldest dropped
    assert len(state["recent"]) == 3 and v.score == pytest.approx(1.0)  # each point is 1 from its nearest


def test_prada_grows_per_class_sets_and_thresholds_by_hand():
    # Class 0 gets 0, then 4 (distance 4 > threshold max(0, mean(0) - std(0)) = 0: joins), then 5: nearest 4, so
    # distance 1; the set's distances are (0, 4): mean 2, std 2, threshold max(0, 0) = 0 -> 1 > 0 joins.
    state = {}
    for v in (0.0, 4.0, 5.0):
        state, verdict = prada(state, np.array([[v]], np.float32), np.zeros(1, int), check_every=1, min_distances=100)
    assert state["dists"].tolist() == [4.0, 1.0]
    assert state["sets"]["0"][:, 0].tolist() == [0.0, 4.0, 5.0]
    # A query of class 1 starts its own set: no distance for it.
    state, _ = prada(state, np.array([[100.0]], np.float32), np.ones(1, int))
    assert state["dists"].tolist() == [4.0, 1.0] and state["sets"]["1"][:, 0].tolist() == [100.0]
    assert verdict.score is None  # fewer than min_distances: not tested yet


def test_prada_flags_distances_that_are_not_normal_and_leaves_normal_ones():
    rng = np.random.default_rng(0)

    def stream(points):
        state, v = {}, None
        for p in points:
            state, v = prada(state, p[None].astype(np.float32), np.zeros(1, int), min_distances=100, set_cap=1000)
        return v
    # Points drawn apart in 16 dimensions: their nearest-neighbour distances spread about normally (W ~ 0.99).
    assert not stream(rng.normal(size=(300, 16))).flagged
    # A thief's pattern (JbDA-like): seeds, then children one fixed-size signed step from each seed: the
    # children's distances pile up at one value while the seeds' stay spread, so W falls (~0.81).
    seeds = rng.normal(size=(150, 16))
    children = seeds + 0.1 * np.sign(rng.normal(size=seeds.shape))
    v = stream(np.concatenate([seeds, children]))
    assert v.flagged and v.score < 0.9


def test_a_state_round_trips_through_bytes():
    state, _ = prada({}, np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32), np.array([0, 1, 0, 1, 2]))
    back = load_state(dump_state(state))
    assert back["count"] == 5 and set(back["sets"]) == {"0", "1", "2"}
    np.testing.assert_array_equal(back["dists"], state["dists"])


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_two_keys_never_share_state(tmp_path, store):
    s = MemoryDetectionStore() if store == "memory" else SQLiteDetectionStore(tmp_path / "d.sqlite")
    for key, value in (("a", 0.0), ("b", 100.0), ("a", 1.0)):
        s.update(key, lambda st, v=value: knn(st, np.array([[v]], np.float32), np.zeros(1, int), k=1, window=1,
                                              buffer=10))
    assert s.get("a")["buffer"][:, 0].tolist() == [0.0, 1.0] and s.get("b")["buffer"][:, 0].tolist() == [100.0]
    assert s.keys() == ["a", "b"]


def test_the_sqlite_store_survives_a_restart_and_clears_a_flag(tmp_path):
    s = SQLiteDetectionStore(tmp_path / "d.sqlite")
    s.update("k", lambda st: knn(st, np.zeros((3, 1), np.float32), np.zeros(3, int), k=1, window=1, buffer=10,
                                 threshold=0.5))
    again = SQLiteDetectionStore(tmp_path / "d.sqlite")  # another process, or the service after a restart
    assert again.flagged("k") and again.get("k")["count"] == 3
    assert again.clear_flag("k") and not s.flagged("k") and s.get("k")["count"] == 3


# ---------------------------------------------------------------- through the real server

KEYS = "thief,honest"
# A knn threshold above any distance between digits: the first scored query flags its key (k 2, window 1).
FLAGS_AT_ONCE = ["--detector", "knn", "--detector-k", "2", "--detector-window", "1", "--detector-threshold", "1e6"]


def _post(server, key: str, n: int = 3) -> httpx.Response:
    return httpx.post(server.url + "/predict", files=files([png(i) for i in digits_test_images(n)]),
                      headers={"Authorization": f"Bearer {key}"})


def test_a_flagged_key_is_refused_under_block_and_the_other_key_is_not(digits_run, tmp_path):
    with serve(digits_run[0] / "model.onnx", "--api-keys", KEYS, *FLAGS_AT_ONCE, "--detection-policy", "block",
               "--detection-db", str(tmp_path / "d.sqlite"), "--budget-images", "100",
               "--budget-db", str(tmp_path / "b.sqlite")) as s:
        r = _post(s, "thief")  # its third image is scored and flags it: nothing is served, nothing charged
        assert r.status_code == 403 and r.json()["reason"] == "extraction_flagged" and "flagged" in r.json()["detail"]
        assert _post(s, "thief", 1).status_code == 403  # and from then on
        usage = httpx.get(s.url + "/v1/usage", headers={"Authorization": "Bearer thief"}).json()
        assert usage["extraction"]["flagged"] and usage["budget_remaining"] == 100
        assert _post(s, "honest", 2).status_code == 200  # another key: its own state, two queries, nothing scored
        assert s.metric("astguard_extraction_flagged_total") == 1
        assert s.metric("astguard_rejections_total", reason="extraction_flagged") == 2


def test_a_flagged_key_gets_one_hot_answers_under_degrade(digits_run, tmp_path):
    with serve(digits_run[0] / "model.onnx", "--api-keys", KEYS, *FLAGS_AT_ONCE, "--detection-policy", "degrade",
               "--detection-db", str(tmp_path / "d.sqlite"), "--budget-db", str(tmp_path / "b.sqlite")) as s:
        before = _post(s, "thief", 2).json()["predictions"]  # not yet scored
        assert all(max(p["probabilities"]) < 1 for p in before)
        after = _post(s, "thief", 3).json()["predictions"]  # flagged by this request: one-hot from now on
        assert all(sorted(p["probabilities"])[-2:] == [0.0, 1.0] for p in after)
        assert [p["label"] for p in after] == [int(np.argmax(p["probabilities"])) for p in after]
        info = httpx.get(s.url + "/v1/model", headers={"Authorization": "Bearer honest"}).json()
        assert info["detection"] == {"detector": "knn", "params": {"k": 2, "window": 1, "buffer": 1000,
                                                                   "threshold": 1e6},
                                     "policy": "degrade", "degraded_defense": "label_only"}


def test_the_state_survives_a_restart_and_an_admin_clears_a_flag(digits_run, tmp_path):
    args = ["--api-keys", KEYS, "--admin-keys", "root", *FLAGS_AT_ONCE, "--detection-policy", "block",
            "--detection-db", str(tmp_path / "d.sqlite"), "--budget-db", str(tmp_path / "b.sqlite")]
    with serve(digits_run[0] / "model.onnx", *args) as s:
        assert _post(s, "thief").status_code == 403
    with serve(digits_run[0] / "model.onnx", *args) as s:  # a restart: the flag is still there
        assert _post(s, "thief", 1).status_code == 403
        root = {"Authorization": "Bearer root"}
        assert httpx.get(s.url + "/v1/usage/all", headers={"Authorization": "Bearer honest"}).status_code == 403
        listed = httpx.get(s.url + "/v1/usage/all", headers=root).json()["keys"]
        assert [(k["key"], k["extraction"]["flagged"]) for k in listed] == [(key_id("thief"), True)]
        cleared = httpx.post(s.url + f"/v1/usage/{key_id('thief')}/clear", headers=root).json()
        assert cleared == {"key": key_id("thief"), "was_flagged": True, "flagged": False}
        usage = httpx.get(s.url + "/v1/usage", headers={"Authorization": "Bearer thief"}).json()
        assert usage["extraction"]["flagged"] is False and usage["extraction"]["queries_seen"] == 3


def test_usage_can_keep_the_score_from_the_key(digits_run, tmp_path):
    with serve(digits_run[0] / "model.onnx", "--detector", "prada", "--no-usage-shows-detection",
               "--detection-db", str(tmp_path / "d.sqlite"), "--budget-db", str(tmp_path / "b.sqlite")) as s:
        usage = httpx.get(s.url + "/v1/usage").json()
    assert "extraction" not in usage and usage["key"] == "anonymous" and usage["budget_remaining"] is None


@pytest.mark.parametrize("args,words", [
    (["--detector", "vibes"], "unknown detector 'vibes'"),
    (["--detection-policy", "shout"], "invalid choice"),
    (["--detector", "knn", "--degraded-defense", "nope"], "unknown output defense 'nope'"),
    (["--detector", "knn", "--detection-db", "/proc/nope/d.sqlite"], "cannot use detection database"),
])
def test_bad_detection_settings_stop_start_up_with_one_line(digits_run, args, words):
    r = subprocess.run([sys.executable, "-m", "service", "--model", str(digits_run[0] / "model.onnx"), *args,
                        "--port", "1"], cwd=REPO, capture_output=True, text=True, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and words in lines[0], r.stderr
    assert math.isfinite(len(lines))
