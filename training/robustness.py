"""How robust a model is: its accuracy on the test split under an L-inf PGD attack, for every exported model.

A served model answers users and adversaries alike; whether a defense's training changes its robustness is a
question a user choosing a defense asks. The settings are named data, by the kind of image:
- `rgb`: eps 8/255, step 2/255, 20 steps, random start: the usual CIFAR-10 setting (RobustBench's threat model).
- `digits`: 8x8 grey digits have 17 grey levels, so 8/255 is a fraction of one level; eps 0.1 (about 1.6 levels),
  step 0.025, 20 steps, random start.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from training.data import Dataset, Split, iterate_in_order
from training.pgd import pgd_linf


@dataclass(frozen=True)
class RobustSetting:
    eps: float
    step: float
    steps: int
    random_start: bool = True
    attack: str = "pgd-linf"


ROBUST_SETTINGS = {
    "rgb": RobustSetting(8 / 255, 2 / 255, 20),
    "digits": RobustSetting(0.1, 0.025, 20),
}


def robust_setting(data: Dataset) -> tuple[str, RobustSetting]:
    name = "digits" if data.name == "digits" else "rgb"
    return name, ROBUST_SETTINGS[name]


def robust_accuracy(model: nn.Module, test: Split, setting: RobustSetting, device, *, batch_size: int = 256,
                    seed: int = 0) -> float:
    """Top-1 accuracy on PGD examples of every test image (the model in eval mode; its weights untouched)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    hits = 0
    for i, x in enumerate(iterate_in_order(test.images, batch_size)):
        y = test.labels[i * batch_size:i * batch_size + len(x)].to(device)
        x_adv = pgd_linf(model, x.to(device), y, eps=setting.eps, step=setting.step, steps=setting.steps,
                         random_start=setting.random_start, generator=g)
        with torch.no_grad():
            hits += int((model(x_adv).argmax(1) == y).sum())
    return hits / len(test.labels)


def robustness(model: nn.Module, data: Dataset, device, *, seed: int = 0, images: int | None = None) -> dict:
    """What the model card records: the accuracy and the attack it was measured under, on the whole test split or
    on a class-balanced subset of `images` of it (the same subset for every model)."""
    name, setting = robust_setting(data)
    test = data.limit_test(images).test if images else data.test
    acc = robust_accuracy(model, test, setting, device, seed=seed)
    return {"accuracy": acc, **asdict(setting), "setting": name, "images": len(test.labels)}
