"""IResNet (the insightface "improved ResNet" for 112x112 faces): iresnet18/34/50/100/200.

Stem: conv3x3(3->64, stride 1) - BN - PReLU. Four stages of :class:`IBasicBlock` at widths
64/128/256/512 (times ``base_width / 64``), each starting with stride 2: 112 -> 56 -> 28 -> 14 -> 7.
Head: BN2d - dropout - flatten - Linear(512*7*7 -> emb) - BatchNorm1d(emb).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from largefr.models.backbone_parts import check_image_input, embed_in_fp32, init_conv_bn, run_stage
from largefr.models.registry import register_backbone

STAGE_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
IMAGE_SIZE = 112
FINAL_SPATIAL = 7  # 112 / 2**4
BN_EPS = 1e-5


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus the (projected) input."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=BN_EPS)
        self.conv1 = conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.prelu = nn.PReLU(cout)
        self.conv2 = conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(cout, eps=BN_EPS),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


def make_stage(cin: int, cout: int, blocks: int) -> nn.Sequential:
    layers = [IBasicBlock(cin, cout, stride=2)]
    layers += [IBasicBlock(cout, cout, stride=1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class IResNet(nn.Module):
    def __init__(
        self,
        blocks: tuple[int, int, int, int],
        embedding_size: int = 512,
        dropout: float = 0.0,
        base_width: int = 64,
        grad_checkpoint: bool = False,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"IResNet needs 4 positive stage depths, got {blocks}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if base_width < 1:
            raise ValueError(f"base_width must be >= 1, got {base_width}")
        self.image_size = IMAGE_SIZE
        self.embedding_size = embedding_size
        self.grad_checkpoint = grad_checkpoint
        widths = [base_width * m for m in (1, 2, 4, 8)]
        self.conv1 = conv3x3(3, base_width)
        self.bn1 = nn.BatchNorm2d(base_width, eps=BN_EPS)
        self.prelu = nn.PReLU(base_width)
        cins = [base_width, *widths[:-1]]
        self.stages = nn.ModuleList(make_stage(ci, co, n) for ci, co, n in zip(cins, widths, blocks))
        self.bn2 = nn.BatchNorm2d(widths[-1], eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(widths[-1] * FINAL_SPATIAL * FINAL_SPATIAL, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=BN_EPS)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        init_conv_bn(self)
        # As in insightface: the embedding BN keeps scale 1 (only its shift is learned).
        self.features.weight.requires_grad_(False)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.zeros_(m.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image_input(x, self.image_size, type(self).__name__)
        x = self.prelu(self.bn1(self.conv1(x)))
        for stage in self.stages:
            x = run_stage(stage, x, self.grad_checkpoint)
        x = torch.flatten(self.dropout(self.bn2(x)), 1)
        return embed_in_fp32(self.fc, self.features, x)


def _factory(depth: int) -> Callable[..., IResNet]:
    def build(embedding_size: int = 512, **kwargs: Any) -> IResNet:
        return IResNet(STAGE_BLOCKS[depth], embedding_size=embedding_size, **kwargs)

    build.__name__ = f"iresnet{depth}"
    build.__doc__ = f"IResNet-{depth}: stage depths {STAGE_BLOCKS[depth]}."
    return build


for _depth in STAGE_BLOCKS:
    register_backbone(f"iresnet{_depth}")(_factory(_depth))
