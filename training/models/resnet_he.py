"""He et al. (2016) CIFAR ResNets: 6n+2 layers, 16-32-64 channels, 1x1 conv + BN shortcuts (option B)."""
from __future__ import annotations

import torch
from torch import nn

from training.models import register_model
from training.models.resnet_cifar import BasicBlock


class ResNetHe(nn.Module):
    def __init__(self, n: int, num_classes: int, in_channels: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        blocks, cin = [], 16
        for i, planes in enumerate((16, 32, 64)):
            for j in range(n):
                blocks.append(BasicBlock(cin, planes, 2 if i > 0 and j == 0 else 1))
                cin = planes
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # fan_out keeps activations' variance stable through the ReLU stack (He et al. 2015).
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.layers(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


@register_model
def resnet20(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """He et al.'s CIFAR ResNet-20 (0.27 M parameters): the CPU scale's teacher"""
    return ResNetHe(3, num_classes, in_channels)


@register_model
def resnet32(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """He et al.'s CIFAR ResNet-32 (6n+2 layers, n=5)"""
    return ResNetHe(5, num_classes, in_channels)
