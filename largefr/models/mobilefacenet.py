"""MobileFaceNet (Chen et al., 2018) for 112x112 faces.

Paper table 1 (t: expansion, c: channels, n: repeats, s: stride of the first repeat):
conv3x3 64 /2 -> depthwise conv3x3 64 -> bottlenecks (2,64,5,2) (4,128,1,2) (2,128,6,1) (4,128,1,2)
(2,128,2,1) -> conv1x1 512 -> linear GDConv7x7 (global depthwise) -> linear 1x1 to the embedding.
Non-linearity is PReLU; the bottleneck's projection and the GDC/embedding layers are linear.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from largefr.models.backbone_parts import check_image_input, embed_in_fp32, init_conv_bn, run_stage
from largefr.models.registry import register_backbone

# (expansion t, out channels c, repeats n, first stride s)
BOTTLENECKS: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)
IMAGE_SIZE = 112
FINAL_SPATIAL = 7


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.PReLU(cout))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """MobileNetV2 inverted residual: 1x1 expand - 3x3 depthwise(stride) - linear 1x1 project."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            conv_bn(cin, hidden, 1),
            conv_bn(hidden, hidden, 3, stride=stride, groups=hidden),
            conv_bn(hidden, cout, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class MobileFaceNet(nn.Module):
    def __init__(self, embedding_size: int = 512, grad_checkpoint: bool = False, width: int = 64) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.image_size = IMAGE_SIZE
        self.embedding_size = embedding_size
        self.grad_checkpoint = grad_checkpoint
        scale = width / 64
        self.stem = nn.Sequential(
            conv_bn(3, width, 3, stride=2),
            conv_bn(width, width, 3, groups=width),
        )
        stages: list[nn.Module] = []
        cin = width
        for t, c, n, s in BOTTLENECKS:
            cout = max(1, round(c * scale))
            blocks = [Bottleneck(cin if i == 0 else cout, cout, s if i == 0 else 1, t) for i in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.ModuleList(stages)
        last = 8 * width
        self.conv_sep = conv_bn(cin, last, 1)
        self.gdc = conv_bn(last, last, FINAL_SPATIAL, groups=last, act=False)
        self.gdc[0].padding = (0, 0)  # global depthwise conv: 7x7 -> 1x1
        self.linear = nn.Linear(last, embedding_size, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_input(x, self.image_size, type(self).__name__)
        x = self.stem(x)
        for stage in self.stages:
            x = run_stage(stage, x, self.grad_checkpoint)
        x = torch.flatten(self.gdc(self.conv_sep(x)), 1)
        return embed_in_fp32(self.linear, self.features, x)


@register_backbone("mobilefacenet")
def mobilefacenet(embedding_size: int = 512, **kwargs: Any) -> MobileFaceNet:
    """MobileFaceNet; ``width`` (default 64) scales every layer's channels proportionally."""
    return MobileFaceNet(embedding_size=embedding_size, **kwargs)
