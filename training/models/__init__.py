"""Model registry: `create_model("resnet18", num_classes=10)`; a new architecture is one decorated function.

Every model is wrapped in `Normalized`, so it takes [0,1] pixels and the exported ONNX graph carries the
data set's mean/std: a client never has to know them.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register `fn(num_classes, in_channels, image_size) -> nn.Module` under its own name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


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
    if name not in _MODELS:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(list_models())}")
    body = _MODELS[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    mean = mean if mean is not None else [0.0] * in_channels
    std = std if std is not None else [1.0] * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std need {in_channels} values, got {len(mean)}/{len(std)}")
    return Normalized(body, mean, std)


# Importing the architecture modules registers them.
from training.models import cnn, resnet_cifar, resnet_he, shufflenetv2  # noqa: E402,F401
