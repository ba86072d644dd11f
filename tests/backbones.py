"""Small backbones with trained-looking BatchNorm for the evaluation and export tests."""
from __future__ import annotations

import pytest
import torch

from largefr.models import build_backbone


def calibrated_backbone(name: str, embedding_size: int, seed: int = 0, **kwargs: object) -> torch.nn.Module:
    """``build_backbone`` in eval mode with random BatchNorm affine and statistics measured on one batch."""
    torch.manual_seed(seed)
    model = build_backbone(name, embedding_size, **kwargs)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batch
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.2, 0.2)
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 112, 112))
    return model.eval()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: OpenMP threads only contend, so use one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
