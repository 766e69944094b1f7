"""LTD and the misinformation model (training/ltd.py, training/misinformation.py), and robust accuracy
(training/robustness.py): their losses by hand and tiny runs on digits."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from conftest import TINY
from training.config import make_config
from training.data import Split, load_dataset
from training.ltd import ltd_loss
from training.misinformation import misinformation_loss
from training.robustness import RobustSetting, robust_accuracy
from training.train_ast import run


def test_the_ltd_loss_is_t_s_squared_kl_from_the_low_temperature_teacher():
    teacher, student = torch.tensor([[math.log(3), 0.0]]), torch.tensor([[0.0, 0.0]])
    # T_t = 0.5: softmax(2 ln3, 0) = (9/10, 1/10); the student at T_s = 2: (1/2, 1/2); times T_s^2 = 4.
    got = ltd_loss(student, teacher, teacher_temperature=0.5, student_temperature=2.0)
    expected = 4 * (0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_the_misinformation_loss_is_minus_log_one_minus_p_true():
    logits = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]])  # p = (3/4, 1/4), (1/2, 1/2)
    got = misinformation_loss(logits, torch.tensor([0, 1]))
    assert got.item() == pytest.approx((-math.log(1 - 0.75) - math.log(1 - 0.5)) / 2, rel=1e-6)
    assert math.isfinite(misinformation_loss(torch.tensor([[50.0, 0.0]]), torch.tensor([0])).item())


def test_a_tiny_ltd_run_is_more_robust_than_its_base(tmp_path):
    summary = run(make_config("digits", **{**TINY, "teacher": "ltd", "epochs": 3}), tmp_path / "ltd", device="cpu",
                  progress=False)
    card = json.loads((tmp_path / "ltd" / "model.json").read_text())
    assert card["teacher"]["hyperparameters"]["ltd_teacher_temperature"] == 0.5
    assert summary["robust_accuracy"] > summary["base"]["robust_accuracy"] + 0.1  # 0.58 against 0.28 when written


def test_the_misinformation_model_names_the_model_it_pairs_with(tmp_path):
    run(make_config("digits", **{**TINY, "teacher": "misinformation", "epochs": 2}), tmp_path / "m", device="cpu",
        progress=False)
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    base = json.loads((tmp_path / "m" / "base" / "model.json").read_text())
    assert card["teacher"]["hyperparameters"]["pairs_with"] == {"name": base["name"], "version": base["version"],
                                                                "sha256": base["sha256"]}


def test_robust_accuracy_is_clean_accuracy_at_radius_zero_and_lower_under_attack(digits_run):
    from training.models import create_model

    data = load_dataset("digits")
    model = create_model("digits_cnn", 10, 1, 8, data.mean, data.std)
    model.load_state_dict(torch.load(digits_run[0] / "base" / "checkpoint.pt", weights_only=False)["model"])
    model.eval()
    test = Split(data.test.images[:200], data.test.labels[:200])
    with torch.no_grad():
        clean = float((model(test.images.float() / 255).argmax(1) == test.labels).float().mean())
    at_zero = robust_accuracy(model, test, RobustSetting(0.0, 0.0, 5, random_start=False), "cpu")
    attacked = robust_accuracy(model, test, RobustSetting(0.1, 0.025, 20), "cpu")
    assert at_zero == pytest.approx(clean) and attacked < clean - 0.2
    constant = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    nn.init.zeros_(constant[1].weight)  # answers class 0 whatever the input: no attack can move it
    nn.init.zeros_(constant[1].bias)
    assert robust_accuracy(constant, test, RobustSetting(0.3, 0.1, 5), "cpu") == pytest.approx(
        float((test.labels == 0).float().mean()))
