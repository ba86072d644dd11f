"""batch_to_chw / put_chw: decoded HWC images -> the step's uint8 CHW layout, flipped where flagged."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from largefr.data.layout import batch_to_chw, put_chw


def _expected(images: torch.Tensor, flips: np.ndarray) -> torch.Tensor:
    out = images.permute(0, 3, 1, 2).clone()
    out[torch.from_numpy(flips)] = out[torch.from_numpy(flips)].flip(3)  # mirror: reverse the width axis
    return out.contiguous()


@pytest.mark.parametrize("on_host", [True, False])
def test_batch_to_chw_transposes_and_mirrors_exactly_the_flagged_images(on_host: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 7, 6, 3), dtype=torch.uint8, generator=gen)
    flips = np.array([True, False, False, True, True])
    out = batch_to_chw(images, flips, on_host=on_host)
    assert out.shape == (5, 3, 7, 6) and out.dtype == torch.uint8 and out.is_contiguous()
    assert torch.equal(out, _expected(images, flips))
    assert torch.equal(out[1], images[1].permute(2, 0, 1))  # an unflagged image is only transposed
    assert torch.equal(out[0, :, :, 0], images[0, :, -1].t())  # a flagged one: its last column comes first


def test_put_chw_writes_one_image_in_place() -> None:
    hwc = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    out = np.empty((3, 4, 5), dtype=np.uint8)
    put_chw(out, hwc, flip=True)
    assert np.array_equal(out, hwc[:, ::-1].transpose(2, 0, 1))
    put_chw(out, hwc, flip=False)
    assert np.array_equal(out, hwc.transpose(2, 0, 1))


def test_bad_batches_name_what_was_expected() -> None:
    with pytest.raises(ValueError, match=r"uint8 \[B, H, W, 3\]"):
        batch_to_chw(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), np.zeros(2, dtype=bool))
    with pytest.raises(ValueError, match="1 flags for a batch of 2"):
        batch_to_chw(torch.zeros(2, 4, 4, 3, dtype=torch.uint8), np.zeros(1, dtype=bool))
