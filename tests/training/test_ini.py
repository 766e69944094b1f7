"""InI (training/ini.py): each term against values worked out by hand, the double backpropagation, the frozen
clone, PCGrad, and a tiny run on digits."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from conftest import REPO
from training.config import make_config
from training.data import Batch
from training.ini import centred_log_softmax, distance, ini_terms, kl_to
from training.pcgrad import pcgrad
from training.teachers import TEACHERS, Context
from training.train_ast import run


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def test_the_distance_and_kl_by_hand():
    v = torch.tensor([[1.0, 0.0, -1.0]])
    s = torch.tensor([[0.5, 0.5, -1.0]])
    log_p = np.log(softmax(np.array([1.0, 0.0, -1.0])))
    centred = log_p - log_p.mean()  # = (1, 0, -1): the logits were already centred
    np.testing.assert_allclose(centred_log_softmax(v).numpy()[0], centred, atol=1e-6)
    assert distance(v, s).item() == pytest.approx(np.abs(np.array([0.5, 0.5, -1.0]) - centred).mean(), rel=1e-6)
    p, q = softmax(np.array([0.5, 0.5, -1.0])), softmax(np.array([1.0, 0.0, -1.0]))
    assert kl_to(s, v).item() == pytest.approx(float((p * np.log(p / q)).sum()), rel=1e-5)


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_the_gradient_terms_by_hand_on_a_linear_clone():
    torch.manual_seed(0)
    victim = TwoLayer()
    shadow = nn.Linear(3, 2, bias=False)  # S(x) = W x: its gradients have a closed form
    x, u, y = torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([[1.0, 1.0, -0.5]]), torch.tensor([1])
    terms, _ = ini_terms(victim, shadow, x, y, u)
    W = shadow.weight.detach().numpy()
    with torch.no_grad():
        v_x, v_u = victim(x).numpy()[0], victim(u).numpy()[0]

    def grad_kl(inp, v):  # d/dW KL(softmax(W inp) || softmax(v)) = outer(sigma * (log sigma - log nu - KL), inp)
        s = W @ inp
        sig, nu = softmax(s), softmax(v)
        kl = float((sig * np.log(sig / nu)).sum())
        return np.outer(sig * (np.log(sig) - np.log(nu) - kl), inp)

    def grad_ce(inp, label):  # d/dW CE(W inp, label) = outer(sigma - onehot, inp)
        sig = softmax(W @ inp)
        return np.outer(sig - np.eye(2)[label], inp)

    g1, g2 = grad_kl(x.numpy()[0], v_x).ravel(), grad_ce(x.numpy()[0], 1).ravel()
    assert terms["grad_cos"].item() == pytest.approx(float(g1 @ g2 / np.linalg.norm(g1) / np.linalg.norm(g2)),
                                                     rel=1e-4)
    assert terms["grad_ood"].item() == pytest.approx(float(np.abs(grad_kl(u.numpy()[0], v_u)).mean()), rel=1e-4)
    assert terms["ce"].item() == pytest.approx(float(-np.log(softmax(v_x)[1])), rel=1e-5)


def test_the_double_backpropagation_term_changes_the_victims_gradient():
    torch.manual_seed(1)
    victim, shadow = TwoLayer(), TwoLayer().eval()
    x, u, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 1, 0])

    def victim_grad(term: str):
        terms, _ = ini_terms(victim, shadow, x, y, u)
        return torch.cat([g.flatten() for g in torch.autograd.grad(terms[term], list(victim.parameters()),
                                                                    allow_unused=True) if g is not None])
    cos_grad = victim_grad("grad_cos")
    assert cos_grad.abs().sum() > 0  # the cosine of the clone's gradients reaches the victim's weights
    assert victim_grad("grad_ood").abs().sum() > 0


def test_pcgrad_removes_the_conflicting_component_and_averages():
    p = torch.zeros(2, requires_grad=True)
    a = (p * torch.tensor([1.0, 0.0])).sum()  # gradient (1, 0)
    b = (p * torch.tensor([-1.0, 1.0])).sum()  # gradient (-1, 1): conflicts with a (dot -1)
    (merged,) = pcgrad([a, b], [p], torch.Generator().manual_seed(0))
    # a loses its component along b: (1,0) - (-1)/2 * (-1,1) = (0.5, 0.5); b along a: (-1,1) + (1,0) = (0, 1).
    torch.testing.assert_close(merged, torch.tensor([0.25, 0.75]))  # their mean


def test_a_tiny_ini_run_trains_exports_and_never_changes_the_clone(tmp_path):
    cfg = make_config("digits", teacher="ini", ood="noise", epochs=2, limit_train=300)
    summary = run(cfg, tmp_path / "ini", device="cpu", progress=False)
    card = json.loads((tmp_path / "ini" / "model.json").read_text())
    assert card["teacher"]["type"] == "ini" and card["teacher"]["hyperparameters"]["ood"] == "noise"
    assert card["teacher"]["hyperparameters"]["ini_epsilon"] == 1000.0
    assert summary["test_accuracy"] > 0.2
    log = [json.loads(line) for line in (tmp_path / "ini" / "log.jsonl").read_text().splitlines()]
    assert {"ce", "ood", "grad_cos", "grad_ood", "id_push"} <= set(log[-1])


def test_the_clone_is_frozen_through_training_steps():
    from training.data import load_dataset
    from training.models import create_model

    data = load_dataset("digits")
    cfg = make_config("digits", teacher="ini", ood="noise")
    victim = create_model("digits_cnn", 10, 1, 8, data.mean, data.std)
    shadow = create_model("digits_cnn", 10, 1, 8, data.mean, data.std).eval()
    before = {k: v.clone() for k, v in shadow.state_dict().items()}
    opt = torch.optim.SGD(victim.parameters(), lr=0.1)
    x = data.train.images[:16].float() / 255
    batch = Batch(x, data.train.labels[:16], torch.arange(16), pair=torch.rand_like(x))
    for _ in range(3):
        TEACHERS["ini"].loss(victim, batch, Context(cfg, top_k=2, shadow=shadow))
        opt.step()
    for k, v in shadow.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_ini_without_ood_images_is_one_clear_line(tmp_path):
    r = subprocess.run([sys.executable, "training/train_ast.py", "--dataset", "digits", "--teacher", "ini", "--out",
                        str(tmp_path / "x")], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--teacher ini needs --ood SPEC" in lines[0], r.stderr
