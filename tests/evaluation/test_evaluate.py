"""The evaluation harness, end to end on digits at the smoke scale: every table cell, the cache, the endpoint."""
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import REPO, serve
from evaluation.evaluate import main
from training.files import exclusive

TEACHERS = ["base", "ast", "nt", "stt", "ini", "ltd", "st", "misinformation"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    argv = ["--dataset", "digits", "--scale", "smoke", "--students", "cnn5,digits_cnn", "--sweep", "alpha=0.2",
            "--attacks", "soft,hard", "--out", str(root / "results"), "--work-dir", str(root / "work"),
            "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    first = json.loads((root / "results" / "results.json").read_text())
    return root, argv, first


def _finite(x):
    return isinstance(x, float) and math.isfinite(x)


def test_results_json_has_every_cell_of_the_tables(smoke):
    root, _, r = smoke
    students = ["cnn5", "digits_cnn"]
    assert r["settings"]["teachers"] == TEACHERS
    for name in TEACHERS + ["ast alpha=0.2"]:
        t = r["teachers"][name]
        assert 0 <= t["accuracy"]["mean"] <= 1 and _finite(t["change_from_base"]["mean"])
        for protocol in ("paper", "query"):
            if protocol == "paper" and name == "misinformation":  # a serving-time defense: no white-box cells
                assert name not in r["students"]["paper"]
                continue
            for s in students:
                cell = r["students"][protocol][name][s]
                assert 0 <= cell["accuracy"]["mean"] <= 1 and _finite(cell["change_from_alone"]["mean"])
                assert cell["accuracy"]["values"] and cell["accuracy"]["std"] == 0.0  # one seed
        for stat in ("entropy", "within_class_kl"):
            assert set(r["statistics"][name][stat]) == {"mean", "var", "min", "max"}
    assert r["teachers"]["base"]["change_from_base"]["mean"] == 0.0
    # Robust accuracy: every network's, from training; a serving-time defense leaves the base network's.
    for name in TEACHERS:
        assert 0 <= r["teachers"][name]["robust_accuracy"]["mean"] <= 1, name
    assert r["teachers"]["misinformation"]["robust_accuracy"] == r["teachers"]["base"]["robust_accuracy"]
    assert r["settings"]["robustness"]["setting"] == "digits" and r["settings"]["robustness"]["steps"] == 20
    # ST is the base network: same accuracy, sparser answers.
    assert r["teachers"]["st"]["accuracy"] == r["teachers"]["base"]["accuracy"]
    assert r["statistics"]["st"]["entropy"]["mean"] < r["statistics"]["base"]["entropy"]["mean"]
    assert set(r["students"]["alone"]) == set(students)
    assert r["sweeps"] == {"alpha": [{"value": 0.2, "row": "ast alpha=0.2"}]}
    assert set(r["examples"]["answers"]) == {"base", "base on its PGD image", "ast", "nt", "stt", "ini", "ltd"}
    assert r["run"]["trained"]["teacher_epochs"] > 0 and r["run"]["trained"]["student_epochs"] > 0
    # Beside every row: a student of the thief's architecture trained with the true labels of the thief's queries,
    # what the strongest thief gains over it, and the row's serving latency.
    for s in students:
        assert 0 < r["students"]["reference"][s]["mean"] <= 1
        for name in TEACHERS:
            gain = r["worst_case"][name][s]["minus_reference"]
            assert gain["mean"] == pytest.approx(r["worst_case"][name][s]["accuracy"]["mean"]
                                                 - r["students"]["reference"][s]["mean"])
    assert set(r["latency_ms"]) == set(TEACHERS) | {"ast alpha=0.2"} and all(v > 0 for v in r["latency_ms"].values())
    # Paired differences against Base, seed by seed: Base's own is 0 exactly.
    assert r["students"]["query"]["base"]["cnn5"]["change_from_base"]["values"] == [0.0]
    assert r["students"]["paper"]["ast"]["cnn5"]["change_from_base"]["mean"] == pytest.approx(
        r["students"]["paper"]["ast"]["cnn5"]["accuracy"]["mean"] - r["students"]["paper"]["base"]["cnn5"]["accuracy"]
        ["mean"])


def test_report_has_the_tables_and_figures(smoke):
    root, _, _ = smoke
    md = (root / "results" / "results.md").read_text()
    for heading in ("Paper protocol", "Query protocol", "Table 3 shape", "Ablation: AST alpha"):
        assert heading in md
    assert "| Student alone |" in md and "| st |" in md and "| Reference (queries with labels) |" in md
    # The table a practitioner acts on comes first: every defense, its worst case, its latency.
    glance = md.split("## At a glance: which defense, at what cost")[1].split("## ")[0]
    assert md.index("## At a glance") < md.index("## Paper protocol")
    for name in TEACHERS:
        assert f"| {name} |" in glance
    assert "Worst-case stolen cnn5 (%)" in glance and "Added latency (ms/image)" in glance
    for png in ("fig2_responses.png", "entropy_histograms.png", "tradeoff.png"):
        assert (root / "results" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_second_run_with_the_same_settings_trains_nothing(smoke):
    root, argv, first = smoke
    assert main(argv) == 0
    second = json.loads((root / "results" / "results.json").read_text())
    assert second["run"]["trained"] == {"teacher_epochs": 0, "student_epochs": 0, "attacks": 0}
    assert second["teachers"] == first["teachers"] and second["students"] == first["students"]
    assert second["attacks"] == first["attacks"] and second["worst_case"] == first["worst_case"]


def test_a_live_endpoint_is_evaluated_with_the_query_protocol(smoke, digits_run):
    root, _, _ = smoke
    model, summary = digits_run
    with serve(model / "model.onnx") as server:
        argv = ["--dataset", "digits", "--scale", "smoke", "--teachers", "base", "--attacks", "soft", "--url", server.url,
                "--out", str(root / "endpoint"), "--work-dir", str(root / "work"), "--no-progress", "--device", "cpu"]
        assert main(argv) == 0
        served = sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(server.url + "/metrics").text.splitlines()
                     if line.startswith("astguard_images_served_total"))
        # Answers bought before the attacker library kept them as .npz (plain .npy) are read, not bought again.
        for kept in (root / "work" / "endpoint").glob("*.npz"):
            np.save(kept.with_suffix(".npy"), np.load(kept)["probs"])
            kept.unlink()
        assert main([str(root / "endpoint-again") if a == str(root / "endpoint") else a for a in argv]) == 0
        again = sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(server.url + "/metrics").text.splitlines()
                    if line.startswith("astguard_images_served_total"))
        assert again == served and len(list((root / "work" / "endpoint").glob("*.npz"))) == 2
    r = json.loads((root / "endpoint" / "results.json").read_text())
    # The endpoint's own accuracy, measured through it on the smoke test set, is close to the card's.
    assert abs(r["teachers"]["endpoint"]["accuracy"]["mean"] - summary["test_accuracy"]) < 0.1
    assert "endpoint" in r["students"]["query"] and "endpoint" not in r["students"]["paper"]
    assert "n/a: no logits" in (root / "endpoint" / "results.md").read_text()
    assert served >= 600 + 300  # every query and test image went over HTTP


def test_a_serving_time_defense_is_a_query_protocol_row_on_the_base_network(smoke):
    root, _, _ = smoke
    argv = ["--dataset", "digits", "--scale", "smoke", "--teachers", "base,label_only", "--students", "cnn5",
            "--attacks", "soft",
            "--out", str(root / "defense"), "--work-dir", str(root / "work"), "--no-progress", "--device", "cpu"]
    assert main(argv) == 0
    r = json.loads((root / "defense" / "results.json").read_text())
    assert r["run"]["trained"]["teacher_epochs"] == 0  # the base network, trained for the first run
    assert r["teachers"]["label_only"]["accuracy"] == r["teachers"]["base"]["accuracy"]  # the label is the model's
    assert r["settings"]["defenses"] == {"label_only": {"defense": "label_only", "params": {}}}
    assert r["settings"]["row_kinds"] == {"base": "teacher", "label_only": "serving-time defense"}
    cell = r["students"]["query"]["label_only"]["cnn5"]["accuracy"]["mean"]
    assert 0 <= cell <= 1 and "label_only" not in r["students"]["paper"]
    assert "n/a: serving-time defense" in (root / "defense" / "results.md").read_text()


def test_every_row_is_attacked_by_the_whole_suite_and_judged_by_its_worst_case(smoke):
    root, _, first = smoke
    argv = ["--dataset", "digits", "--scale", "smoke", "--teachers", "base,ast", "--students", "digits_cnn",
            "--protocols", "query", "--out", str(root / "suite"), "--work-dir", str(root / "work"), "--no-progress",
            "--device", "cpu"]  # --attacks all is the default
    assert main(argv) == 0
    r = json.loads((root / "suite" / "results.json").read_text())
    from clients.attack.attacks import attack_names
    for row in ("base", "ast"):
        cells = r["attacks"][row]["digits_cnn"]
        assert list(cells) == attack_names("all")
        worst = r["worst_case"][row]["digits_cnn"]
        best = max(c["accuracy"]["mean"] for c in cells.values())
        assert worst["accuracy"]["mean"] == best and cells[worst["attacks"][0]]["accuracy"]["mean"] == best
        # The label-mode attack is the query protocol's student itself (the same training, to the bit).
        same = pytest.approx(r["students"]["query"][row]["digits_cnn"]["accuracy"]["mean"], abs=5e-5)  # 4 places
        assert cells["soft"]["accuracy"]["mean"] == same
        assert first["students"]["query"][row]["digits_cnn"]["accuracy"]["mean"] == same.expected
    resistance = r["resistance"]["ast"]["digits_cnn"]["mean"]
    assert resistance == pytest.approx(r["worst_case"]["base"]["digits_cnn"]["accuracy"]["mean"]
                                       - r["worst_case"]["ast"]["digits_cnn"]["accuracy"]["mean"])
    assert r["resistance"]["base"]["digits_cnn"]["mean"] == 0.0
    assert r["worst_case"]["ast"]["digits_cnn"]["change_from_base"]["mean"] == pytest.approx(-resistance)
    md = (root / "suite" / "results.md").read_text()
    assert "## The attack suite (query protocol)" in md and "worst-case digits_cnn (%)" in md
    assert (root / "suite" / "attacks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(argv) == 0  # every attack's result is read back: nothing trained, nothing bought
    again = json.loads((root / "suite" / "results.json").read_text())
    assert again["run"]["trained"] == {"teacher_epochs": 0, "student_epochs": 0, "attacks": 0}
    assert again["attacks"] == r["attacks"]


@pytest.mark.parametrize("args, message", [
    (["--teachers", "base,bogus"], "unknown teacher 'bogus'"),
    (["--sweep", "lr=0.1"], "--sweep takes FIELD=V1,V2"),
    (["--sweep", "alpha=high"], "cannot read 'high'"),
    (["--students", "nope"], "unknown student 'nope'"),
    (["--protocols", "paper,white"], "unknown protocol 'white'"),
    (["--scale", "paper", "--protocols", "query"], "needs training images the teacher did not see"),
    (["--set", "colour=red"], "--set takes FIELD=VALUE"),
    (["--set", "dataset=cifar10"], "other than dataset"),
    (["--set", "alpha=lots"], "alpha: cannot read 'lots'"),
    (["--seeds", "0,0"], "--seeds repeats a seed"),
    (["--sweep", "alpha=0.1", "--sweep", "alpha=0.2"], "names a field twice"),
    (["--kd-temperature", "0"], "--kd-temperature must be positive"),
    (["--jobs", "0"], "--jobs must be at least 1"),
    (["--teachers", "base,round", "--protocols", "paper"], "round is a serving-time defense"),
    (["--teachers", "base,none"], "unknown teacher 'none'"),
    (["--attacks", "soft,bogus"], "unknown attack 'bogus'"),
    (["--teachers", "base,nt:alpha=0.1"], "nt's hyperparameters are nt_weight"),
    (["--teachers", "base,bogus:alpha=0.1"], "unknown teacher 'bogus'"),
    (["--teachers", "base,nt:nt_weight=much"], "cannot read 'much'"),
    (["--teachers", "base,nt:"], "names at least one FIELD=VALUE"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, args, message):
    code = main(["--out", str(tmp_path / "r"), "--work-dir", str(tmp_path / "w"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_set_reads_lists_as_astguard_train_does():
    from evaluation.config import parse_set as _assignment
    assert _assignment("milestones=10,20") == ("milestones", (10, 20))
    assert _assignment("flip=false") == ("flip", False)


def test_the_recorded_command_never_holds_the_api_key():
    from evaluation.evaluate import redact
    assert redact(["--url", "http://x", "--api-key", "s3cret", "--api-key=other"]) == \
        ["--url", "http://x", "--api-key", "***", "--api-key=***"]


def test_a_recipe_variant_is_a_row_of_its_own_with_its_own_network(tmp_path):
    argv = ["--dataset", "digits", "--scale", "smoke", "--teachers", "base,nt,nt:nt_weight=0.04", "--students", "cnn5",
            "--protocols", "paper", "--out", str(tmp_path / "r"), "--work-dir", str(tmp_path / "w"), "--no-progress"]
    assert main(argv) == 0
    r = json.loads((tmp_path / "r" / "results.json").read_text())
    assert r["settings"]["teachers"] == ["base", "nt", "nt nt_weight=0.04"]
    nets = sorted(d.name.split("-")[0] for d in (tmp_path / "w" / "teachers").iterdir() if d.is_dir())
    assert nets == ["base", "nt", "nt"]  # two Nasty Teachers: the preset's w (0.004 on digits) and 0.04
    cards = [json.loads(p.read_text())["teacher"]["hyperparameters"]["nt_weight"]
             for p in (tmp_path / "w" / "teachers").glob("nt-*/model.json")]
    assert sorted(cards) == [0.004, 0.04]
    assert "| nt nt_weight=0.04 |" in (tmp_path / "r" / "results.md").read_text()


def test_a_scales_recipe_reductions_yield_to_set_and_to_a_variant(tmp_path, monkeypatch):
    from evaluation import config, evaluate
    from evaluation.config import Scale
    scale = Scale("reduced ltd", dict(epochs=4, limit_train=600, limit_test=300),
                  recipes={"ltd": dict(epochs=1, ltd_steps=3, init_from_base=True)}, query_size=300)
    monkeypatch.setitem(config.SCALES, "reduced", scale)
    monkeypatch.setitem(evaluate.SCALES, "reduced", scale)

    def cfg(teachers, *sets):
        ev = evaluate.Evaluation(config.EvalConfig(out=tmp_path / "r", dataset="digits", scale="reduced",
                                                   work_dir=tmp_path / "w", teachers=teachers.split(","),
                                                   set=[config.parse_set(a) for a in sets]))
        return {r.name: ev.teacher_cfg(r, 0) for r in ev.rows}

    plain = cfg("base,ltd,ltd:ltd_steps=7")
    assert (plain["ltd"].epochs, plain["ltd"].ltd_steps, plain["ltd"].init_from_base) == (1, 3, True)
    assert plain["ltd"].base_epochs == 4 and plain["base"].epochs == 4  # the shared base keeps its epochs
    assert plain["ltd ltd_steps=7"].ltd_steps == 7 and plain["ltd ltd_steps=7"].epochs == 1  # the variant wins
    given = cfg("base,ltd", "epochs=6", "init_from_base=false")
    assert (given["ltd"].epochs, given["ltd"].init_from_base, given["ltd"].ltd_steps) == (6, False, 3)


def test_a_row_asked_for_twice_is_an_error(tmp_path, capsys):
    code = main(["--teachers", "base,ast:alpha=0.2", "--sweep", "alpha=0.2", "--out", str(tmp_path / "r"),
                 "--work-dir", str(tmp_path / "w")])
    assert code == 2 and "asked for twice" in capsys.readouterr().err


def test_teachers_trained_once_serve_every_student_seed(tmp_path):
    argv = ["--dataset", "digits", "--scale", "smoke", "--teachers", "base,st", "--seeds", "2", "--teacher-seed", "0",
            "--protocols", "paper", "--out", str(tmp_path / "r"), "--work-dir", str(tmp_path / "w"), "--no-progress"]
    assert main(argv) == 0
    r = json.loads((tmp_path / "r" / "results.json").read_text())
    assert r["teachers"]["base"]["accuracy"]["std"] == 0.0  # one teacher ...
    assert len(set(r["students"]["paper"]["base"]["cnn5"]["accuracy"]["values"])) == 2  # ... two student seeds
    assert r["run"]["trained"]["teacher_epochs"] == 4  # the base, once
    # Two seeds: each cell carries its 95% t interval, and the report prints it.
    cell = r["students"]["paper"]["st"]["cnn5"]
    assert cell["accuracy"]["ci95"] == pytest.approx(12.7062 * cell["accuracy"]["std"] / math.sqrt(2))
    assert cell["change_from_base"]["values"] == pytest.approx(
        [a - b for a, b in zip(cell["accuracy"]["values"], r["students"]["paper"]["base"]["cnn5"]["accuracy"]["values"])])
    assert "95% t interval over the 2 seeds" in (tmp_path / "r" / "results.md").read_text()


def _waiting_on(path: Path) -> bool:
    """Whether some process is blocked waiting for a lock on `path` (Linux lists waiters with '->')."""
    inode = f":{path.stat().st_ino} "
    return any("->" in line and inode in line for line in Path("/proc/locks").read_text().splitlines())


def test_a_student_run_another_job_holds_is_waited_for_then_trained_once(tmp_path):
    # What keeps two --jobs workers (or two evaluations on one work directory) from training one student at once.
    if not Path("/proc/locks").exists():
        pytest.skip("needs Linux's /proc/locks to see a process waiting for a lock")
    argv = ["--dataset", "digits", "--scale", "smoke", "--teachers", "base", "--protocols", "paper", "--work-dir",
            str(tmp_path / "w"), "--no-progress", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "r0")]) == 0
    (student,) = [d for d in (tmp_path / "w" / "students").iterdir()
                  if d.is_dir() and json.loads((d / "metrics.json").read_text())["settings"]["protocol"] == "paper"]
    for name in ("metrics.json", "checkpoint.pt"):
        (student / name).unlink()
    lock = student.with_name(student.name + ".lock")
    with exclusive(lock):  # another job is training this student
        proc = subprocess.Popen([sys.executable, "-m", "evaluation", *argv, "--out", str(tmp_path / "r1")],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not _waiting_on(lock) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        waited = _waiting_on(lock)
        assert waited and not (student / "metrics.json").exists(), "the evaluation did not wait for the lock"
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    r = json.loads((tmp_path / "r1" / "results.json").read_text())
    assert r["run"]["trained"] == {"teacher_epochs": 0, "student_epochs": 2, "attacks": 0}  # that student, once
    assert (student / "metrics.json").exists()


def test_jobs_fan_teachers_and_student_groups_out_to_processes_and_train_each_exactly_once(tmp_path):
    # The sweep's row "ast alpha=0.05" is the default ast again: its teacher and students are the same runs as
    # ast's, held by other jobs of the same wave, and must still be trained once.
    argv = ["--dataset", "digits", "--scale", "smoke", "--teachers", "base,ast,st", "--seeds", "2", "--teacher-seed",
            "0", "--sweep", "alpha=0.05", "--attacks", "soft", "--out", str(tmp_path / "r"), "--work-dir",
            str(tmp_path / "w"), "--no-progress", "--device", "cpu"]
    assert main([*argv, "--jobs", "2"]) == 0
    r = json.loads((tmp_path / "r" / "results.json").read_text())
    assert r["run"]["jobs"] == 2
    # base and ast once (4 epochs each); per seed 8 student groups' worth of cnn5 (alone, reference, paper x3,
    # query x3), 2 epochs each: nothing trained twice by two workers, nothing left for the sequential pass.
    # The attack suite (soft alone here) runs once per row and seed: the sweep's row is ast's again.
    assert r["run"]["trained"] == {"teacher_epochs": 8, "student_epochs": 2 * 8 * 2, "attacks": 3 * 2}
    for protocol in ("paper", "query"):
        assert r["students"][protocol]["ast alpha=0.05"] == r["students"][protocol]["ast"]
        for name in ("base", "ast", "st"):
            assert len(r["students"][protocol][name]["cnn5"]["accuracy"]["values"]) == 2
    assert len(list((tmp_path / "w" / "logs").glob("worker-*.log"))) == 2
    assert main(argv) == 0  # the same evaluation in one process finds every job done
    again = json.loads((tmp_path / "r" / "results.json").read_text())
    assert again["run"]["trained"] == {"teacher_epochs": 0, "student_epochs": 0, "attacks": 0}
    assert again["teachers"] == r["teachers"] and again["students"] == r["students"]


def test_a_race_runs_only_the_first_seeds_close_attacks_again_with_the_scales_attack_parameters(tmp_path,
                                                                                                monkeypatch):
    import dataclasses

    import evaluation.config as config
    import evaluation.evaluate as evaluate
    raced = dataclasses.replace(config.SCALES["smoke"], race=3.0, attacks={"noise": {"mode": "hard"}})
    monkeypatch.setitem(config.SCALES, "smoke", raced)
    argv = ["--dataset", "digits", "--scale", "smoke", "--teachers", "base", "--students", "digits_cnn",
            "--protocols", "query", "--attacks", "soft,noise", "--seeds", "2", "--teacher-seed", "0",
            "--out", str(tmp_path / "r"), "--work-dir", str(tmp_path / "w"), "--no-progress", "--device", "cpu"]
    # The waves of --jobs: the later seed's suite comes after the first seed's, the small groups beside it.
    waves = evaluate.Evaluation(evaluate.parse_args(argv)).waves()
    assert waves[-1] == [(1, "query base")] and (0, "query base") in waves[-2] and (1, "alone") in waves[-2]
    cells_of = []  # the teachers' own cells: computed once for the teacher seed both student seeds share
    real = evaluate.Evaluation.teacher_cells
    monkeypatch.setattr(evaluate.Evaluation, "teacher_cells",
                        lambda self, *a, **k: (cells_of.append(1), real(self, *a, **k))[1])
    assert main(argv) == 0
    r = json.loads((tmp_path / "r" / "results.json").read_text())
    assert len(cells_of) == 1 and r["per_seed"][0]["teachers"] == r["per_seed"][1]["teachers"]
    assert r["per_seed"][0]["latency_ms"] and not r["per_seed"][1]["latency_ms"]
    first, second = (s["attacks"]["base"]["digits_cnn"] for s in r["per_seed"])
    assert first["soft"]["student_accuracy"] - first["noise"]["student_accuracy"] > 0.03  # noise is far behind ...
    assert list(second) == ["soft"] and r["per_seed"][1]["raced"] == {"base": {"digits_cnn": ["noise"]}}  # ... out
    cells = r["attacks"]["base"]["digits_cnn"]
    assert cells["noise"]["accuracy"]["raced_out"] and len(cells["noise"]["accuracy"]["values"]) == 1
    assert "raced_out" not in cells["soft"]["accuracy"] and len(cells["soft"]["accuracy"]["values"]) == 2
    assert r["worst_case"]["base"]["digits_cnn"]["attacks"] == ["soft", "soft"]
    assert r["worst_case"]["base"]["digits_cnn"]["raced_out"] == ["noise"]  # judged by fewer attacks: said so
    assert first["noise"]["settings"]["mode"] == "hard" and r["settings"]["attack_params"]["noise"] == {"mode": "hard"}
    md = (tmp_path / "r" / "results.md").read_text()
    assert "† raced out" in md and "noise mode=hard" in md and "† the seeds after the first ran only" in md
    assert r["settings"]["recipes"] == {"base": {}}


def test_a_scales_attack_parameter_that_does_not_exist_fails_before_anything_trains(tmp_path, monkeypatch):
    import dataclasses

    import evaluation.config as config
    import evaluation.evaluate as evaluate
    monkeypatch.setitem(config.SCALES, "smoke", dataclasses.replace(config.SCALES["smoke"],
                                                                    attacks={"noise": {"rounds": 2}}))
    argv = ["--dataset", "digits", "--scale", "smoke", "--teachers", "base", "--attacks", "noise",
            "--out", str(tmp_path / "r"), "--work-dir", str(tmp_path / "w"), "--no-progress"]
    with pytest.raises(ValueError, match="attack 'noise' has no parameter 'rounds'; it takes mode"):
        evaluate.Evaluation(evaluate.parse_args(argv))
    assert not (tmp_path / "w" / "teachers").exists()
