"""normalize_images / InputBuffer: uint8 batches -> the backbones' float32 input, against float64."""
from __future__ import annotations

import pytest
import torch

from largefr.models.input import InputBuffer, normalize_images


def reference(images: torch.Tensor) -> torch.Tensor:
    return (images.double() - 127.5) / 127.5


def test_every_uint8_value_maps_to_its_float64_value():
    values = torch.arange(256, dtype=torch.uint8).repeat(3 * 4 * 4).reshape(16, 3, 4, 64)
    out = normalize_images(values)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert (out.double() - reference(values)).abs().max() <= 2e-7
    assert abs(float(out.min()) + 1.0) <= 2e-7 and abs(float(out.max()) - 1.0) <= 2e-7  # one float32 ulp


def test_strided_input_gives_a_contiguous_result_in_the_given_buffer():
    hwc = torch.randint(0, 256, (5, 7, 9, 3), dtype=torch.uint8)
    nchw = hwc.permute(0, 3, 1, 2)  # channels-last strides, as embed_images hands them
    out = torch.full((5, 3, 7, 9), float("nan"))
    result = normalize_images(nchw, out=out)
    assert result.data_ptr() == out.data_ptr() and result.is_contiguous()
    assert (result.double() - reference(nchw)).abs().max() <= 2e-7


def test_input_buffer_reuses_its_buffer_while_the_shape_stays():
    buffer = InputBuffer(torch.device("cpu"))
    a = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    first = buffer(a).data_ptr()
    second = buffer(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8))
    assert second.data_ptr() == first
    smaller = buffer(a[:2])
    assert smaller.shape == (2, 3, 8, 8) and (smaller.double() - reference(a[:2])).abs().max() <= 2e-7


def test_bad_input_names_what_was_expected():
    with pytest.raises(TypeError, match="must be uint8.*float32"):
        normalize_images(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\], got \[1, 4, 4\]"):
        normalize_images(torch.zeros(1, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="out must be float32"):
        normalize_images(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), out=torch.empty(1, 3, 4, 4, dtype=torch.float16))
