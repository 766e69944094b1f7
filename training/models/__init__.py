"""Model registry (MODELS): `create_model("resnet18", num_classes=10)`; a new architecture is one decorated function,
whose docstring's first line is its summary in --help and the README.

Every model is wrapped in `Normalized`, so it takes [0,1] pixels and the exported ONNX graph carries the
data set's mean/std: a client never has to know them.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from astguard.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("architecture")


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register `fn(num_classes, in_channels, image_size) -> nn.Module` under its own name."""
    summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else fn.__name__
    return MODELS.register(fn.__name__, fn, summary=summary)


def list_models() -> list[str]:
    return sorted(MODELS)


class Normalized(nn.Module):
    """(x - mean) / std in front of `body`, so the model's input is [0,1] pixels."""

    def __init__(self, body: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.body = body
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.mean) / self.std)


def create_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Normalized:
    body = MODELS[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    mean = mean if mean is not None else [0.0] * in_channels
    std = std if std is not None else [1.0] * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std need {in_channels} values, got {len(mean)}/{len(std)}")
    return Normalized(body, mean, std)


# Importing the architecture modules registers them.
from training.models import cnn, resnet_cifar, resnet_he, shufflenetv2  # noqa: E402,F401
