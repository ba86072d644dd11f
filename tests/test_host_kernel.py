"""The compiled host SGD kernel (largefr.heads.host_kernel): the same bits as the optimizer's torch path for
every storage combination it serves, a clear error for bad input, and a fallback when it cannot be built."""
from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from largefr import PartialFC, margins
from largefr.heads import host_kernel
from largefr.heads.host_kernel import ENABLE_VARIABLE, host_kernels, sgd_rows_

# torch's CPU SGD uses fused multiply-adds in its AVX2 / AVX-512 (and Arm) kernels, as the C kernel does;
# torch's generic kernel rounds the product first, so there the two may differ in the last bit
FUSED_TORCH_KERNELS = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in (
    "aarch64", "arm64")

needs_kernel = pytest.mark.skipif(host_kernels() is None, reason="no working C compiler for the host SGD kernel")


def _train(weight_dtype: str, state_dtype: str, momentum: float, nesterov: bool, weight_decay: float,
           storage: str | None) -> tuple[list[torch.Tensor], bool]:
    """W and momentum after 3 steps over > 2 update blocks (2048 rows each, the last one partial)."""
    head = PartialFC(margins.CosFace(scale=8.0), 16, 9000, 0.6, weight_dtype=weight_dtype, seed=4, storage_device=storage)
    opt = head.optimizer("sgd", lr=0.5, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                         state_dtype=state_dtype)
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        head(torch.randn(64, 16, generator=gen), torch.randint(0, 9000, (64,), generator=gen)).backward()
        opt.step()
        opt.zero_grad()
    assert head.sampled_class_ids.numel() > 2 * 2048
    state = [t.clone() for t in opt.state[head.weight].values() if t.dim() > 0]
    return [head.weight.detach().clone(), *state], opt.steps_sampled_rows_on_host_kernel()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


@needs_kernel
@pytest.mark.parametrize("weight_dtype, state_dtype, momentum, nesterov, weight_decay, storage", [
    ("fp32", "fp32", 0.9, False, 5e-4, None), ("bf16", "bf16", 0.9, False, 5e-4, None),
    ("bf16", "fp32", 0.9, True, 5e-4, "cpu"), ("fp32", "bf16", 0.9, True, 0.0, None),
    ("bf16", "bf16", 0.0, False, 5e-4, None), ("fp32", "fp32", 0.0, False, 0.0, None),
])
def test_kernel_gives_the_bits_of_the_torch_path(
    monkeypatch: pytest.MonkeyPatch, weight_dtype: str, state_dtype: str, momentum: float, nesterov: bool,
    weight_decay: float, storage: str | None,
) -> None:
    monkeypatch.setenv(ENABLE_VARIABLE, "1")
    kernel, used = _train(weight_dtype, state_dtype, momentum, nesterov, weight_decay, storage)
    monkeypatch.setenv(ENABLE_VARIABLE, "0")
    torch_path, used_without = _train(weight_dtype, state_dtype, momentum, nesterov, weight_decay, storage)
    assert used and not used_without
    assert len(kernel) == len(torch_path) == (2 if momentum else 1)
    for got, want in zip(kernel, torch_path):
        assert got.dtype == want.dtype
        if FUSED_TORCH_KERNELS:
            assert torch.equal(_bits(got), _bits(want))
        else:
            torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-6)


def test_fp16_storage_and_adamw_keep_the_torch_path() -> None:
    fp16 = PartialFC(margins.CosFace(), 8, 100, 0.5, weight_dtype="fp16")
    bf16 = PartialFC(margins.CosFace(), 8, 100, 0.5, weight_dtype="bf16")
    assert not fp16.optimizer("sgd", lr=0.1, momentum=0.9).steps_sampled_rows_on_host_kernel()
    assert not bf16.optimizer("adamw", lr=0.1).steps_sampled_rows_on_host_kernel()


@needs_kernel
def test_bad_input_names_the_values() -> None:
    library = host_kernels()
    assert library is not None
    weight, momentum = torch.zeros(10, 4), torch.zeros(10, 4)
    rows, grad = torch.zeros(2, 4), torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"row ids must lie in \[0, 10\), got \[3, 10\]"):
        sgd_rows_(library, torch.tensor([3, 10]), rows, grad, weight, momentum, None, 0.1, 0.9, 0.0, False)
    with pytest.raises(ValueError, match=r"grad must be contiguous host fp32 of shape \(2, 4\), got torch.float32 \(2, 5\)"):
        sgd_rows_(library, torch.tensor([3, 4]), rows, torch.zeros(2, 5), weight, momentum, None, 0.1, 0.9, 0.0, False)
    with pytest.raises(ValueError, match=r"momentum \(10, 5\) must have the shape of weight \(10, 4\)"):
        sgd_rows_(library, torch.tensor([3, 4]), rows, grad, weight, torch.zeros(10, 5), None, 0.1, 0.9, 0.0, False)
    with pytest.raises(ValueError, match="bf16 storage needs 8 contiguous uint16 noise words, got None"):
        sgd_rows_(library, torch.tensor([3, 4]), rows, grad, weight.bfloat16(), None, None, 0.1, 0.9, 0.0, False)
    with pytest.raises(ValueError, match="weight torch.float16"):
        sgd_rows_(library, torch.tensor([3, 4]), rows, grad, weight.half(), None, None, 0.1, 0.9, 0.0, False)


def test_a_failing_build_falls_back_with_a_warning(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(host_kernel, "_loaded", {})
    monkeypatch.setenv("LARGEFR_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.warns(RuntimeWarning, match="could not build the host SGD kernel"):
        assert host_kernels() is None
    head = PartialFC(margins.CosFace(), 8, 100, 0.5, weight_dtype="bf16")
    assert not head.optimizer("sgd", lr=0.1, momentum=0.9).steps_sampled_rows_on_host_kernel()


@needs_kernel
def test_builds_into_an_empty_cache_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(host_kernel, "_loaded", {})
    monkeypatch.setenv("LARGEFR_KERNEL_DIR", str(tmp_path / "kernels"))
    assert host_kernels() is not None
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].name.startswith("row_sgd-") and built[0].suffix == ".so"
