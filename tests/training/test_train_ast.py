"""The whole offline pipeline on digits: base -> PGD -> teacher -> verified ONNX + model card."""
import json
import subprocess
import sys

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch

from conftest import REPO, TINY, serve
from training.config import make_config
from training.data import load_dataset
from training.export import sha256_file
from training.loop import RunError
from training.models import create_model
from training.teachers import TEACHERS
from training.train_ast import main, run


def _load_weights(out, data):
    model = create_model("digits_cnn", 10, 1, 8, data.mean, data.std)
    model.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=False)["model"])
    return model.eval()


def test_a_tiny_digits_run_leaves_a_teacher_whose_onnxruntime_outputs_match_pytorch(digits_run):
    out, summary = digits_run
    data = load_dataset("digits")
    model = _load_weights(out, data)
    x = data.test.images.float() / 255
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    probs, logits = session.run(["probabilities", "logits"], {"image": x.numpy()})
    with torch.no_grad():
        ref = model(x)
    assert np.abs(logits - ref.numpy()).max() < 1e-4
    assert np.abs(probs - torch.softmax(ref, 1).numpy()).max() < 1e-5
    assert (probs.argmax(1) == ref.argmax(1).numpy()).all()
    assert np.allclose(probs.sum(1), 1, atol=1e-6)
    assert summary["test_accuracy"] > 0.8 and summary["base"]["test_accuracy"] > 0.8
    assert (out / "base" / "model.onnx").exists() and (out / "base" / "model.json").exists()


def test_the_model_card_describes_the_file_the_input_the_classes_and_the_recipe(digits_run):
    out, summary = digits_run
    card = json.loads((out / "model.json").read_text())
    assert card["sha256"] == sha256_file(out / "model.onnx")
    assert card["input"] == {"name": "image", "shape": [-1, 1, 8, 8], "dtype": "float32", "layout": "NCHW",
                             "color_mode": "L", "value_range": [0.0, 1.0]}
    assert card["class_names"] == [str(i) for i in range(10)]
    assert card["teacher"]["type"] == "ast"
    assert card["teacher"]["hyperparameters"] == {"alpha": 0.05, "temperature": 6.0, "top_k": 2,
                                                  "divergence": "epd-code", "pgd_eps": 0.3, "pgd_step": 0.01,
                                                  "pgd_steps": 5, "pgd_random_start": False}
    assert card["accuracy"]["teacher"] == summary["test_accuracy"]
    assert card["accuracy"]["base"] == summary["base"]["test_accuracy"]
    assert card["dataset"]["name"] == "digits" and card["dataset"]["train_size"] == 1437
    assert card["name"] == "digits-ast" and card["version"] == "1" and card["created"]
    assert json.loads((out / "base" / "model.json").read_text())["teacher"]["type"] == "base"


def test_each_epoch_is_logged_with_its_loss_terms_and_accuracy(digits_run):
    out, _ = digits_run
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, TINY["epochs"] + 1))
    for r in rows:
        assert {"loss", "divergence", "ce", "train_accuracy", "test_accuracy", "lr"} <= set(r)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pgd"]["base_accuracy_on_adversarial_train"] < metrics["base"]["test_accuracy"]
    assert metrics["pgd"]["max_linf"] <= 0.3 + 1e-3


def test_a_finished_run_is_reused_and_a_changed_setting_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "r"
    cfg = make_config("digits", **{**TINY, "epochs": 1, "pgd_steps": 2})
    run(cfg, out, device="cpu", progress=False)
    log = (out / "log.jsonl").read_text()
    calls = []
    run(cfg, out, device="cpu", progress=False, on_epoch_end=lambda *a: calls.append(a))
    assert calls == [] and (out / "log.jsonl").read_text() == log
    changed = make_config("digits", **{**TINY, "epochs": 1, "pgd_steps": 2, "alpha": 0.1})
    with pytest.raises(RunError, match="alpha"):
        run(changed, out, device="cpu", progress=False)
    # The base model does not depend on alpha, so --overwrite retrains only the teacher... and works.
    summary = run(changed, out, device="cpu", progress=False, overwrite=True)
    assert json.loads((out / "model.json").read_text())["teacher"]["hyperparameters"]["alpha"] == 0.1
    assert summary["teacher"] == "ast"


def test_resume_after_an_interruption_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    cfg = make_config("digits", **{**TINY, "epochs": 3, "pgd_steps": 2})
    cache = tmp_path / "cache"
    run(cfg, tmp_path / "whole", device="cpu", progress=False, cache_dir=cache)

    def interrupt(stage, epoch, row):
        if stage == "ast" and epoch == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "cut", device="cpu", progress=False, cache_dir=cache, on_epoch_end=interrupt)
    with pytest.raises(RunError, match="--resume"):
        run(cfg, tmp_path / "cut", device="cpu", progress=False, cache_dir=cache)
    run(cfg, tmp_path / "cut", device="cpu", progress=False, cache_dir=cache, resume=True)
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    cut = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert whole["epoch"] == cut["epoch"] == 3
    for k, v in whole["model"].items():
        assert torch.equal(v, cut["model"][k]), k
    assert [r["test_accuracy"] for r in whole["history"]] == [r["test_accuracy"] for r in cut["history"]]


@pytest.mark.parametrize("teacher", sorted(set(TEACHERS) - {"ast"}))
def test_every_other_teacher_recipe_trains_and_exports(tmp_path, teacher):
    cfg = make_config("digits", **{**TINY, "epochs": 2, "teacher": teacher, "ood": "noise"})
    summary = run(cfg, tmp_path / teacher, device="cpu", progress=False)
    card = json.loads((tmp_path / teacher / "model.json").read_text())
    assert card["teacher"]["type"] == teacher
    if TEACHERS[teacher].row:
        assert summary["test_accuracy"] > 0.3  # better than chance (0.1) after two epochs
    else:  # the misinformation model: it learns to avoid the true class, so it is worse than chance
        assert summary["test_accuracy"] < 0.05
    assert "pgd" not in summary  # only AST needs the adversarial set
    robust = card["robustness"]
    assert robust["attack"] == "pgd-linf" and robust["setting"] == "digits" and robust["images"] == 360
    if TEACHERS[teacher].row:  # and it serves: the real service answers with its probabilities
        import io

        from PIL import Image
        buf = io.BytesIO()
        Image.fromarray(load_dataset("digits").test.images[0, 0].numpy()).save(buf, "PNG")
        with serve(tmp_path / teacher / "model.onnx", "--budget-db", str(tmp_path / "b.sqlite")) as s:
            r = httpx.post(s.url + "/predict", files=[("files", ("d.png", buf.getvalue(), "image/png"))])
        assert r.status_code == 200 and len(r.json()["predictions"][0]["probabilities"]) == 10
    assert 0 <= robust["accuracy"] <= summary["test_accuracy"] + 1e-9 and summary["robust_accuracy"] == robust["accuracy"]


@pytest.mark.parametrize("args,message", [
    (["--dataset", "imagenet"], "unknown data set 'imagenet'"),
    (["--dataset", "/nonexistent/cifar.zip"], "does not exist"),
    (["--sparse-ratio", "1.5"], "--sparse-ratio must be in (0, 1]"),
    (["--sparse-ratio", "0"], "--sparse-ratio must be in (0, 1]"),
    (["--arch", "vgg99"], "unknown --arch 'vgg99'"),
    (["--top-k", "11"], "exceeds the number of classes"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
])
def test_bad_arguments_exit_non_zero_with_one_line_naming_the_problem(tmp_path, capsys, args, message):
    assert main(["--out", str(tmp_path / "x"), "--epochs", "1", "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("astguard-train: error:") and message in err[0], err


def test_the_script_runs_as_documented_and_reports_argument_errors_without_a_traceback(tmp_path):
    script = [sys.executable, str(REPO / "training" / "train_ast.py")]
    helped = subprocess.run(script + ["--help"], capture_output=True, text=True, cwd=tmp_path)
    assert helped.returncode == 0
    for word in ("--preset", "cifar10-resnet18", "--divergence", "epd-paper", "resnet18", "nt", "--resume"):
        assert word in helped.stdout
    bad = subprocess.run(script + ["--out", "x", "--preset", "nope"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "invalid choice" in bad.stderr
    ok = subprocess.run(script + ["--dataset", "digits", "--out", str(tmp_path / "run"), "--epochs", "1",
                                  "--pgd-steps", "1", "--no-progress"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["teacher"] == "ast" and (tmp_path / "run" / "model.onnx").exists()


def test_two_runs_racing_for_one_run_directory_train_it_once(tmp_path):
    # The stage lock (evaluate --jobs relies on it): the second run waits, then reuses what the first trained.
    cmd = [sys.executable, str(REPO / "training" / "train_ast.py"), "--dataset", "digits", "--teacher", "base",
           "--epochs", "2", "--limit-train", "300", "--no-progress", "--out", str(tmp_path / "run")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum("reusing the finished run" in err for _, err in outputs) == 1
    assert len((tmp_path / "run" / "base" / "log.jsonl").read_text().splitlines()) == 2
    assert json.loads(outputs[0][0])["sha256"] == json.loads(outputs[1][0])["sha256"]
