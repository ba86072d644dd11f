"""The compiled host SGD kernel (largefr.heads.host_kernel): the same bits as the optimizer's torch path for
every storage combination it serves (row widths a multiple of torch's vectors; otherwise within a rounding),
a clear error for bad input, and a fallback when it cannot be built."""
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
    rows, grad, ids = torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor([3, 4])

    def call(**changed: object) -> None:
        args = dict(ids=ids, rows=rows, grad=grad, weight=weight, momentum=momentum, noise=None)
        args.update(changed)
        sgd_rows_(library, args["ids"], args["rows"], args["grad"], args["weight"], args["momentum"], args["noise"],
                  0.1, 0.9, 0.0, False)

    with pytest.raises(ValueError, match=r"row ids must be strictly increasing in \[0, 10\), got \[3, 10\]"):
        call(ids=torch.tensor([3, 10]))
    with pytest.raises(ValueError, match=r"strictly increasing in \[0, 10\), got \[4, 4\]"):
        call(ids=torch.tensor([4, 4]))
    with pytest.raises(ValueError, match=r"grad must be contiguous host fp32 of shape \(2, 4\), got torch.float32 \(2, 5\)"):
        call(grad=torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"rows must be contiguous host fp32"):
        call(rows=torch.zeros(2, 4)._neg_view())  # a lazy negation: its bytes are not its values
    with pytest.raises(ValueError, match=r"momentum torch.float32 \(10, 5\) on cpu must be contiguous host fp32 or bf16"):
        call(momentum=torch.zeros(10, 5))
    with pytest.raises(ValueError, match=r"weight torch.float32 \(10, 4, 3\) on cpu must be a contiguous host fp32 or "
                                         r"bf16 \[rows, 4\] slice"):
        call(weight=torch.zeros(10, 4, 3))
    with pytest.raises(ValueError, match="weight torch.float16"):
        call(weight=weight.half(), momentum=None)
    with pytest.raises(ValueError, match="bf16 storage needs 8 contiguous host uint16 noise words, got None"):
        call(weight=weight.bfloat16(), momentum=None)
    with pytest.raises(ValueError, match="noise words, got .*meta"):
        call(weight=weight.bfloat16(), momentum=None, noise=torch.zeros(8, dtype=torch.uint16, device="meta"))


@needs_kernel
def test_a_row_width_outside_torchs_vectors_stays_within_a_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    """D = 5: torch updates a block's last n*D mod 8 (16) elements with scalar code whose rounding its compiler
    chose, so only there may the two paths differ, by at most an fp32 rounding of the update."""
    results = []
    for enabled in ("1", "0"):
        monkeypatch.setenv(ENABLE_VARIABLE, enabled)
        head = PartialFC(margins.CosFace(scale=8.0), 5, 301, 0.5, seed=4)
        opt = head.optimizer("sgd", lr=0.5, momentum=0.9, weight_decay=5e-4)
        gen = torch.Generator().manual_seed(6)
        for _ in range(10):
            head(torch.randn(16, 5, generator=gen), torch.randint(0, 301, (16,), generator=gen)).backward()
            opt.step()
            opt.zero_grad()
        results.append([head.weight.detach().clone(), opt.state[head.weight]["momentum_buffer"].clone()])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_an_unknown_cc_is_reported_not_replaced(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(host_kernel, "_loaded", {})
    monkeypatch.setenv("LARGEFR_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-xyz -O2")
    if host_kernel._x86() and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("torch runs its generic kernels here: the kernel is not used, so nothing is built")
    with pytest.warns(RuntimeWarning, match="CC='no-such-compiler-xyz -O2' is not a command found on PATH"):
        assert host_kernels() is None


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
    assert built[0].stat().st_mode & 0o777 == 0o755  # loadable by the other users of a shared cache
