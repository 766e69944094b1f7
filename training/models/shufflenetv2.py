"""ShuffleNetV2 1x (Ma et al. 2018) for 32x32: 3x3 stride-1 stem and no max-pool, so stages run 32->16->8->4."""
from __future__ import annotations

import torch
from torch import nn

from training.models import register_model


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    # reshape/transpose only: exports to ONNX as Reshape + Transpose with a dynamic batch.
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        branch = cout // 2
        if stride == 2:
            self.branch1 = nn.Sequential(_conv_bn(cin, cin, 3, 2, groups=cin, relu=False), _conv_bn(cin, branch, 1))
        else:
            assert cin == cout, "a stride-1 unit splits its input in half"
            self.branch1 = nn.Identity()
        b2_in = cin if stride == 2 else branch
        self.branch2 = nn.Sequential(
            _conv_bn(b2_in, branch, 1),
            _conv_bn(branch, branch, 3, stride, groups=branch, relu=False),
            _conv_bn(branch, branch, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            keep, x2 = x.chunk(2, dim=1)
            out = torch.cat((keep, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes: int, in_channels: int,
                 stage_channels: tuple[int, ...] = (116, 232, 464), repeats: tuple[int, ...] = (4, 8, 4),
                 final_channels: int = 1024):
        super().__init__()
        self.stem = _conv_bn(in_channels, 24, 3)
        units, cin = [], 24
        for cout, reps in zip(stage_channels, repeats):
            units.append(InvertedResidual(cin, cout, 2))
            units += [InvertedResidual(cout, cout, 1) for _ in range(reps - 1)]
            cin = cout
        self.stages = nn.Sequential(*units)
        self.head = _conv_bn(cin, final_channels, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(final_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.head(self.stages(self.stem(x))))
        return self.fc(torch.flatten(x, 1))


@register_model
def shufflenetv2(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """ShuffleNetV2 1x, stem adapted to 32x32"""
    return ShuffleNetV2(num_classes, in_channels)
