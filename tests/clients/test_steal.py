"""clients/steal.py against a real server: a real theft, label modes, budgets, reuse, defenses, bad input."""
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from clients.attack.answers import TransferSet as Transfer
from clients.steal import main
from conftest import REPO, free_port, serve
from service.access import key_id

FAST = ["--student", "digits_cnn", "--epochs", "3", "--no-progress", "--images-per-request", "16"]


@pytest.fixture(scope="module")
def server(digits_run, tmp_path_factory):
    with serve(digits_run[0] / "model.onnx", "--budget-db", str(tmp_path_factory.mktemp("b") / "b.sqlite")) as s:
        yield s


def test_a_soft_label_theft_beats_chance_and_its_numbers_agree_with_the_server(server, tmp_path):
    before = server.metric("astguard_images_served_total", key="anonymous")
    out = tmp_path / "steal"
    assert main(["--url", server.url, "--queries", "digits:train", "--budget", "300", "--eval", "digits:test",
                 "--out", str(out), "--epochs", "8", *FAST[:1], "digits_cnn", "--no-progress"]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["student_accuracy"] > 0.5  # chance is 0.1
    assert 0 <= r["agreement"] <= 1 and r["kl"] >= 0 and 0 <= r["victim_accuracy"] <= 1
    assert r["queries_used"] == 300 <= r["settings"]["budget"] and r["eval_queries"] == 360
    assert server.metric("astguard_images_served_total", key="anonymous") - before == 300 + 360
    assert r["reference_accuracy"] > 0.5 and r["images_per_s"] > 0 and r["stop_reason"] == "plan complete"
    assert r["victim"]["name"] == "digits-ast" and r["victim"]["teacher"] == "ast"
    assert "| student_accuracy |" in (out / "report.md").read_text()
    t = Transfer.load(out / "transfer.npz")
    assert t.answered.all() and t.images.shape == (300, 1, 8, 8)


@pytest.mark.parametrize("mode", ["soft", "logit", "hard"])
def test_each_label_mode_runs(server, tmp_path, mode):
    out = tmp_path / mode
    assert main(["--url", server.url, "--budget", "64", "--label-mode", mode, "--eval", "digits:test",
                 "--no-reference", "--out", str(out), *FAST]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["settings"]["label_mode"] == mode and r["student_accuracy"] is not None


def test_true_labels_can_be_mixed_in_and_noise_queries_work(server, tmp_path):
    assert main(["--url", server.url, "--budget", "32", "--use-labels", "--alpha", "0.9", "--out",
                 str(tmp_path / "a"), *FAST]) == 0
    assert main(["--url", server.url, "--queries", "noise", "--budget", "32", "--eval", "digits:test",
                 "--out", str(tmp_path / "n"), *FAST]) == 0
    assert json.loads((tmp_path / "n" / "report.json").read_text())["reference_accuracy"] is None  # no labels


def test_an_exhausted_key_makes_the_attack_stop_cleanly_with_what_it_has(digits_run, tmp_path):
    with serve(digits_run[0] / "model.onnx", "--api-keys", "thief", "--budget-images", "100",
               "--budget-db", str(tmp_path / "b.sqlite")) as s:
        out = tmp_path / "steal"
        assert main(["--url", s.url, "--api-key", "thief", "--budget", "300", "--out", str(out), *FAST]) == 0
        r = json.loads((out / "report.json").read_text())
        assert r["stop_reason"] == "server budget exhausted"
        assert r["queries_used"] == 100 == r["transfer_set_size"]
        assert s.metric("astguard_images_served_total", key=key_id("thief")) == 100
        assert s.metric("astguard_rejections_total", reason="budget_exhausted") >= 1


def test_reuse_trains_again_without_a_single_query(server, tmp_path):
    out = tmp_path / "steal"
    args = ["--url", server.url, "--budget", "64", "--out", str(out), *FAST]
    assert main(args) == 0
    served = server.metric("astguard_images_served_total", key="anonymous")
    assert main(args + ["--reuse", "--label-mode", "hard"]) == 0
    assert server.metric("astguard_images_served_total", key="anonymous") == served
    assert json.loads((out / "report.json").read_text())["queries_used"] == 0
    assert main(args) == 2  # a fresh run would throw the paid-for answers away: refused


@pytest.mark.parametrize("defense,check", [
    ("topk", lambda p: ((p > 0).sum(1) <= 2).all()),
    ("label_only", lambda p: np.array_equal(p, np.eye(10)[p.argmax(1)])),
])
def test_output_defenses_change_what_the_attacker_receives(digits_run, tmp_path, defense, check):
    with serve(digits_run[0] / "model.onnx", "--output-defense", defense, "--defense-k", "2",
               "--budget-db", str(tmp_path / "b.sqlite")) as s:
        assert main(["--url", s.url, "--budget", "48", "--out", str(tmp_path / "s"), *FAST]) == 0
    probs = Transfer.load(tmp_path / "s" / "transfer.npz").probs
    assert check(probs) and not check(np.full((2, 10), 0.1, np.float32))


def test_a_server_that_dies_mid_attack_leaves_the_answers_on_disk_and_says_how_to_resume(digits_run, tmp_path,
                                                                                         capsys):
    out = tmp_path / "steal"
    with serve(digits_run[0] / "model.onnx", "--rate-limit-per-s", "4", "--rate-limit-burst", "4",
               "--budget-db", str(tmp_path / "b.sqlite")) as s:
        import threading

        def kill_once_some_answers_are_out():  # on a condition, not a clock: the attack is mid-way, rate-limited
            while s.proc.poll() is None and s.metric("astguard_images_served_total", key="anonymous") < 8:
                time.sleep(0.05)  # how often to look, not what to wait for
            s.proc.kill()

        threading.Thread(target=kill_once_some_answers_are_out, daemon=True).start()
        code = main(["--url", s.url, "--budget", "200", "--concurrency", "1", "--images-per-request", "4",
                     "--retries", "2", "--out", str(out), *FAST[:-2]])
    err = capsys.readouterr().err
    assert code == 3 and "--resume" in err and "transfer.npz" in err
    t = Transfer.load(out / "transfer.npz")
    assert 0 < t.answered.sum() < 200
    with serve(digits_run[0] / "model.onnx", "--budget-db", str(tmp_path / "b2.sqlite")) as s:
        assert main(["--url", s.url, "--budget", "200", "--concurrency", "1", "--images-per-request", "4",
                     "--out", str(out), "--resume", *FAST[:-2]]) == 0
    assert Transfer.load(out / "transfer.npz").answered.all()


@pytest.mark.parametrize("args,words", [
    (["--url", "http://127.0.0.1:{port}"], "cannot reach"),
    (["--queries", "imagenet"], "unknown data set 'imagenet'"),
    (["--student", "vgg99"], "unknown --student 'vgg99'"),
    (["--budget", "0"], "--budget must be at least 1"),
])
def test_bad_input_gets_one_clear_line_and_a_non_zero_exit(server, tmp_path, args, words):
    args = [a.format(port=free_port()) for a in args]
    cmd = ["--url", server.url, "--out", str(tmp_path / "x"), "--retries", "1", *args]
    r = subprocess.run([sys.executable, str(REPO / "clients" / "steal.py"), *cmd], capture_output=True, text=True,
                       timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and words in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_a_wrong_key_is_reported_as_such(digits_run, tmp_path, capsys):
    with serve(digits_run[0] / "model.onnx", "--api-keys", "right", "--budget-db", str(tmp_path / "b.sqlite")) as s:
        assert main(["--url", s.url, "--api-key", "wrong", "--out", str(tmp_path / "x"), *FAST]) == 2
    assert "refused the API key" in capsys.readouterr().err
