"""normalize_images / InputBuffer: the loaders' uint8 batches and mirror flags -> the backbones' float32
input, against float64."""
from __future__ import annotations

import pytest
import torch

from largefr.models.input import InputBuffer, mirrored_chw_on_host, mirrored_on_device, normalize_images


def reference(images: torch.Tensor, mirror: torch.Tensor | None = None) -> torch.Tensor:
    x = (images.double() - 127.5) / 127.5
    if mirror is not None:
        x[mirror] = x[mirror].flip(3)  # mirror: reverse the width axis
    return x


def hwc_batch(n: int = 5, h: int = 7, w: int = 6, seed: int = 0) -> torch.Tensor:
    """A [N, 3, H, W] view of HWC memory, as the loaders hand it."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=gen).permute(0, 3, 1, 2)


def test_every_uint8_value_maps_to_its_float64_value():
    values = torch.arange(256, dtype=torch.uint8).repeat(3 * 4 * 4).reshape(16, 3, 4, 64)
    out = normalize_images(values)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert (out.double() - reference(values)).abs().max() <= 2e-7
    assert abs(float(out.min()) + 1.0) <= 2e-7 and abs(float(out.max()) - 1.0) <= 2e-7  # one float32 ulp


def test_strided_input_gives_a_contiguous_result_in_the_given_buffer():
    nchw = hwc_batch()  # channels-last strides, as the loaders and embed_images hand them
    out = torch.full((5, 3, 7, 6), float("nan"))
    result = normalize_images(nchw, out=out)
    assert result.data_ptr() == out.data_ptr() and result.is_contiguous()
    assert (result.double() - reference(nchw)).abs().max() <= 2e-7


def test_mirror_reverses_the_width_of_exactly_the_flagged_images():
    images = hwc_batch()
    mirror = torch.tensor([True, False, False, True, True])
    out = normalize_images(images, mirror)
    assert out.is_contiguous() and (out.double() - reference(images, mirror)).abs().max() <= 2e-7
    assert torch.equal(out[1], normalize_images(images[1:2])[0])  # an unflagged image is only converted
    assert torch.equal(out[0, :, :, 0], normalize_images(images[:1])[0, :, :, -1])  # flagged: last column first


def test_host_and_device_mirror_give_the_same_bytes():
    # the CPU path (numpy copy per image) and the accelerator path (one torch.where), both run here on CPU
    images = hwc_batch(6, 5, 8, seed=1)
    mirror = torch.tensor([False, True, True, False, True, False])
    host = mirrored_chw_on_host(images, mirror, torch.empty(images.shape, dtype=torch.uint8))
    assert host.is_contiguous() and torch.equal(host, mirrored_on_device(images, mirror))
    assert torch.equal(host[~mirror], images[~mirror])


def test_input_buffer_reuses_its_buffers_while_the_shape_stays():
    buffer = InputBuffer(torch.device("cpu"))
    a = hwc_batch(4, 8, 8)
    flags = torch.tensor([True, False, True, False])
    first = buffer(a, flags).data_ptr()
    second = buffer(hwc_batch(4, 8, 8, seed=2), flags)
    assert second.data_ptr() == first
    smaller = buffer(a[:2], flags[:2])
    assert smaller.shape == (2, 3, 8, 8) and (smaller.double() - reference(a[:2], flags[:2])).abs().max() <= 2e-7


def test_bad_input_names_what_was_expected():
    with pytest.raises(TypeError, match="must be uint8.*float32"):
        normalize_images(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\], got \[1, 4, 4\]"):
        normalize_images(torch.zeros(1, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="out must be float32"):
        normalize_images(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), out=torch.empty(1, 3, 4, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"mirror must be bool \[2\].*torch.int64 \[2\]"):
        normalize_images(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"mirror must be bool \[2\].*\[3\]"):
        normalize_images(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.bool))


@pytest.mark.parametrize("mirrored", [False, True])
@pytest.mark.cuda
def test_cuda_input_equals_the_cpu_input_without_a_host_sync(mirrored: bool):
    from cuda_support import HAS_CUDA, NO_CUDA_REASON

    if not HAS_CUDA:
        pytest.skip(NO_CUDA_REASON)
    images = hwc_batch(8, 112, 112, seed=3)
    mirror = torch.rand(8, generator=torch.Generator().manual_seed(4)) < 0.5 if mirrored else None
    cpu = normalize_images(images, mirror)
    gpu_images = images.cuda()
    gpu_mirror = mirror.cuda() if mirror is not None else None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = InputBuffer(torch.device("cuda"))(gpu_images, gpu_mirror)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert gpu.is_contiguous() and (gpu.cpu() - cpu).abs().max() <= 2.5e-7  # a GPU FMA may round once less
