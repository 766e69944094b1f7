"""The defense-aware thief: it knows the recipe (the victim's card names it; the recipes are public) and learns to
undo it, with nothing but its own data and the answers it bought.

1. On its own queries, labelled by the victim's top-1, it trains a pair of teachers with the public recipes: a base
   and the defended recipe the card names; for a base behind an output defense, the base itself; AST when there
   is neither.
2. It learns a small MLP (C -> 128 -> 64 -> C) from the defended teacher's answers (passed through the victim's
   output defense, as the service would) to the base teacher's, on the same images: its input is the centred
   log-probabilities, its loss KL(base || MLP).
3. It applies the MLP to the victim's answers and distils a student from the result with `logit-kd`.
The thief's teachers use its own student architecture, its student's epochs and the card's hyperparameters for the
defended recipe.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clients.attack.attacks import Setting, Stolen, register_attack
from clients.attack.student import distill_student
from service.defenses import DEFENSES, make_defense
from training.config import Config, make_config
from training.data import Dataset, Split, channel_stats
from training.distill import recovered_logits
from training.loop import predict_logits
from training.losses import kl_divergence
from training.teachers import TEACHERS
from training.train_ast import load_trained, run


class RecoveryMLP(nn.Module):
    """C -> 128 -> 64 -> C, from centred log-probabilities to logits."""

    def __init__(self, classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(classes, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                                 nn.Linear(64, classes))

    def forward(self, probs: Tensor) -> Tensor:
        return self.net(recovered_logits(probs))


def fit_recovery(defended: Tensor, base: Tensor, *, epochs: int = 300, lr: float = 1e-3, batch_size: int = 256,
                 seed: int = 0) -> RecoveryMLP:
    """An MLP mapping defended answers to base answers (probabilities, row for row), by KL(base || MLP) with Adam."""
    torch.manual_seed(seed)
    mlp = RecoveryMLP(defended.shape[1])
    opt = torch.optim.Adam(mlp.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    log_base = torch.log(base.clamp_min(1e-12))
    for _ in range(epochs):
        order = torch.randperm(len(defended), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = kl_divergence(F.log_softmax(mlp(defended[idx]), dim=1), log_base[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return mlp.eval()


def recover(mlp: RecoveryMLP, probs: Tensor) -> Tensor:
    with torch.no_grad():
        return torch.softmax(mlp(probs.float()), dim=1)


def thief_recipe(setting: Setting) -> tuple[str, dict]:
    """The recipe the thief reproduces, and its hyperparameters from the card (those Config has): the recipe the card
    names (for a base, the base itself: whatever output defense it serves behind is then all there is to undo);
    when the card names none the thief knows, the base behind an output defense, or else AST."""
    name = setting.card.teacher_type
    if name in TEACHERS:
        known = set(Config.__dataclass_fields__)
        hyper = (setting.card.teacher.hyperparameters if setting.card.teacher else {}) or {}
        return name, {k: tuple(v) if isinstance(v, list) else v for k, v in hyper.items() if k in known}
    served = (setting.defense or {}).get("name", "none")
    return ("base", {}) if served != "none" else ("ast", {})


def thief_models(setting: Setting, images: Tensor, labels: Tensor, classes: int, epochs: int, recipe: str,
                 hyper: dict) -> tuple[nn.Module, nn.Module]:
    """The thief's base and `recipe` model on its own images (cached in out/teachers by their data and settings)."""
    digest = hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()[:12]
    n = len(labels)
    held = max(1, n // 10)  # a tenth to watch the thief's teachers train on; they still train on all of it
    mean, std = channel_stats(images)
    data = Dataset(f"thief-{digest}", Split(images, labels), Split(images[:held], labels[:held]),
                   [str(c) for c in range(classes)], mean, std)
    s = setting.spec
    cfg = make_config(None, dataset=f"thief-{digest}", arch=s.arch, epochs=epochs, lr=s.lr, batch_size=s.batch_size,
                      crop_pad=s.crop_pad, flip=s.flip, seed=s.seed, teacher=recipe,
                      **({"ood": "noise"} if TEACHERS[recipe].needs_ood and "ood" not in hyper else {}), **hyper)
    settings = {k: v for k, v in cfg.to_dict().items() if not (k == "base_lr" and v is None)}  # keys kept from before
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    out = setting.out / "teachers" / f"{recipe}-{key}"  # its data and settings: another run trains its own
    summary = run(cfg, out, device=str(setting.device), cache_dir=setting.out / "teachers" / ".cache",
                  resume=True, progress=setting.progress, data=data, export=False)
    base = load_trained(cfg, data, out / "base" / "checkpoint.pt", setting.device)
    model = load_trained(cfg, data, Path(summary["checkpoint"]), setting.device) if recipe != "base" else base
    return base, model


def thief_teachers(setting: Setting, images: Tensor, labels: Tensor, classes: int, epochs: int
                   ) -> tuple[nn.Module, nn.Module, str]:
    """The thief's base and defended teachers on its own images."""
    recipe, hyper = thief_recipe(setting)
    base, defended = thief_models(setting, images, labels, classes, epochs, recipe, hyper)
    return base, defended, recipe


def recovery(setting: Setting, epochs: int | None = None, mlp_epochs: int = 300) -> Stolen:
    images, probs, _ = setting.bought()
    classes = probs.shape[1]
    labels = probs.argmax(1)  # the victim's top-1: the thief's only labels
    base, defended, recipe = thief_teachers(setting, images, labels, classes, epochs or setting.spec.epochs)
    served = setting.defense or {"name": "none", "params": {}}
    defend, _ = make_defense(served["name"], **served.get("params", {}))

    def answers_of(model: nn.Module) -> np.ndarray:
        return torch.softmax(predict_logits(model, images, setting.device), dim=1).numpy().astype(np.float32)
    # A defense that reads other models (adaptive misinformation's): the thief trains its own with the public recipe.
    others = {m: answers_of(thief_models(setting, images, labels, classes, epochs or setting.spec.epochs, m, {})[1])
              for m in DEFENSES.entry(served["name"]).get("models", ())}
    p_base = torch.from_numpy(answers_of(base))
    p_def = torch.from_numpy(defend(answers_of(defended), **others))
    mlp = fit_recovery(p_def, p_base, epochs=mlp_epochs, seed=setting.seed)
    restored = recover(mlp, probs)
    student, _ = distill_student(setting.spec, images, restored, None, setting.fallback_test(images, restored),
                                 setting.out / "student", mode="logit-kd", temperature=setting.temperature,
                                 device=setting.device, progress=setting.progress)
    log_base = torch.log(p_base.clamp_min(1e-12))
    with torch.no_grad():  # how far the thief's defended answers were from its base's, before and after the MLP
        before = float(kl_divergence(torch.log(p_def.clamp_min(1e-12)), log_base))
        after = float(kl_divergence(F.log_softmax(mlp(p_def), 1), log_base))
    return Stolen(student, 0, {"recipe": recipe, "output_defense": served["name"], "thief_kl_before": round(before, 4),
                               "thief_kl_after": round(after, 4)})


register_attack("recovery", recovery,
                summary="defense-aware: its own base and defended teachers (the card's recipe) teach an MLP to map "
                        "defended answers back to undefended ones, applied to the victim's before `logit-kd`",
                assumes="a data set to query and the public recipe the card names",
                cost="the shared queries only (its teachers train on them)", epochs=None, mlp_epochs=300)
