"""Small CNNs: the 5-layer KD student (`cnn5`) and a fast net for 8x8 digits (`digits_cnn`)."""
from __future__ import annotations

from torch import nn

from training.models import register_model


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


@register_model
def cnn5(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """The paper's 5-layer student CNN (3 conv + 2 fc, "Net" of Knowledge-Distillation-Pytorch / Nasty Teacher)"""
    side = image_size // 8  # three 2x2 max-pools, each flooring
    if side == 0:
        raise ValueError(f"cnn5 needs image_size >= 8 (three 2x2 max-pools), got {image_size}")
    return nn.Sequential(
        *_conv_bn_relu(in_channels, 32), nn.MaxPool2d(2),
        *_conv_bn_relu(32, 64), nn.MaxPool2d(2),
        *_conv_bn_relu(64, 128), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(128 * side * side, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(128, num_classes),
    )


@register_model
def digits_cnn(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """A small CNN for 8x8 digits; its global pool takes any size"""
    del image_size  # adaptive pooling handles any size >= 2
    return nn.Sequential(
        *_conv_bn_relu(in_channels, 32),
        *_conv_bn_relu(32, 64),
        nn.MaxPool2d(2),
        *_conv_bn_relu(64, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, num_classes),
    )
