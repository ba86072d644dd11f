"""PartialFC on a GPU against the float64 CPU reference; no host sync in the step; row optimizers cuda == CPU.

Every margin (classic and modern; the modern ones' first step, EMA state at its initial value), sample
rates 1, 0.5, 0. Tolerances: fp32 (cuBLAS without TF32, as on CPU): max abs gradient error 2e-4 of the
reference's max abs, loss 1e-5 relative. Under autocast the logits GEMM is 16-bit, and margins with a
hard-negative mask (CurricularFace, inter-class filtering) may flip a few mask entries, so the gradients
are compared by relative Frobenius error: fp16 (10-bit mantissa) 2e-2, loss 1e-2; bf16 (7-bit) 5e-2, loss
4e-2, as tests/test_modern_margins.py holds bf16 on the CPU, except CurricularFace in bf16: 0.3 (measured
0.21 on the CPU's bf16: at bf16's resolution its mask cos > cos(theta_y + m) flips entries, each flip moving
a logit between cos and cos (t + cos)). Max, sum of exp and the loss are fp32 always.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

from cuda_support import CUDA_TESTS, run_gloo_ranks_on_one_gpu
from largefr import PartialFC, margins
from largefr.heads.sampling import init_weight_rows
from multirank import run_ranks
from reference import ALL_MARGINS, MODERN_MARGINS, initial_reference_state, reference_loss_and_grads

pytestmark = CUDA_TESTS

NUM_CLASSES, DIM, BATCH, SEED = 23, 16, 5, 7
MARGINS = ALL_MARGINS + MODERN_MARGINS  # the first step of each (the modern ones' EMA state at its initial value)
RATES = (1.0, 0.5, 0.0)
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": (2e-4, 1e-5), "fp16": (2e-2, 1e-2), "bf16": (5e-2, 4e-2)}  # (grads, loss)


def global_batch(world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(4321 + world_size)
    return torch.randn(world_size * BATCH, DIM, generator=gen), torch.randint(0, NUM_CLASSES, (world_size * BATCH,), generator=gen)


def _head_cases(ctx: Any, precisions: tuple[str, ...]) -> list[dict[str, Any]]:
    torch.backends.cuda.matmul.allow_tf32 = False
    x_all, labels_all = global_batch(ctx.world_size)
    rows = slice(ctx.rank * BATCH, (ctx.rank + 1) * BATCH)
    out = []
    for margin_index, margin in enumerate(MARGINS):
        for rate in RATES:
            for precision in precisions:
                head = PartialFC(margin, DIM, NUM_CLASSES, rate, ctx.group, seed=SEED).to(ctx.device)
                x = x_all[rows].to(ctx.device).requires_grad_(True)
                dtype = PRECISIONS[precision]
                with torch.autocast(ctx.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    loss = head(x, labels_all[rows].to(ctx.device))
                loss.backward()
                grad = head.row_grad()
                out.append(dict(margin=margin_index, rate=rate, precision=precision, loss=loss.item(),
                                device=str(loss.device), x_grad=x.grad.cpu(), ids=head.sampled_class_ids.cpu(),
                                w_grad=grad.grad.cpu(), class_range=head.class_range))
    return out


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float, context: str, low_precision: bool) -> None:
    if not expected.numel():
        return
    diff = actual.double() - expected
    if low_precision:
        err, scale = diff.norm().item(), expected.norm().item()
    else:
        err, scale = diff.abs().max().item(), expected.abs().max().item()
    assert err <= rel * scale + 1e-6, f"{context}: error {err:.3e} vs scale {scale:.3e}"


def check_against_reference(per_rank: list[list[dict[str, Any]]], world_size: int) -> None:
    x_all, labels_all = global_batch(world_size)
    for i in range(len(per_rank[0])):
        cases = [rank_cases[i] for rank_cases in per_rank]
        first = cases[0]
        margin = MARGINS[first["margin"]]
        grad_tol, loss_tol = TOLERANCE[first["precision"]]
        if first["precision"] == "bf16" and isinstance(margin, margins.CurricularFace):
            grad_tol = 0.3
        context = f"world={world_size} {margin} r={first['rate']} {first['precision']}"
        assert first["device"].startswith("cuda"), context
        ids = torch.cat([c["ids"] for c in cases])
        assert torch.equal(ids, torch.unique(ids)) and torch.isin(labels_all, ids).all(), context
        sub = margin.num_sub_centers
        w_rows = init_weight_rows(0, NUM_CLASSES * sub, DIM, SEED)[(ids[:, None] * sub + torch.arange(sub)).reshape(-1)]
        loss, x_grad, w_grad = reference_loss_and_grads(margin, x_all, w_rows, torch.searchsorted(ids, labels_all), 0,
                                                        initial_reference_state(margin), SEED)
        offset = 0
        for rank, c in enumerate(cases):
            assert abs(c["loss"] - loss) <= loss_tol * max(1.0, abs(loss)), f"{context} rank {rank}: {c['loss']} vs {loss}"
            low = first["precision"] != "fp32"
            _close(c["x_grad"], x_grad[rank * BATCH : (rank + 1) * BATCH], grad_tol, f"{context} x grad", low)
            n = c["ids"].numel() * sub
            _close(c["w_grad"], w_grad[offset : offset + n], grad_tol, f"{context} W grad", low)
            offset += n


def test_nccl_world_1_equals_the_float64_reference_for_every_margin_rate_and_precision() -> None:
    per_rank = run_ranks(_head_cases, 1, tuple(PRECISIONS))
    assert len(per_rank[0]) == len(MARGINS) * len(RATES) * len(PRECISIONS)
    check_against_reference(per_rank, 1)


def test_two_gloo_ranks_on_one_gpu_equal_the_reference() -> None:
    per_rank = run_gloo_ranks_on_one_gpu(_head_cases, 2, ("fp32", "bf16"))
    check_against_reference(per_rank, 2)


def _sync_free_steps(ctx: Any) -> list[str]:
    """Forward, backward and optimizer step under set_sync_debug_mode("error"), after one warm-up step."""
    done = []
    # ceil(0.5 * 64) = 32 >= the global batch of 8: the sample size is known without reading the labels
    for rate in (1.0, 0.5):
        for optimizer, hyper in (("sgd", {"momentum": 0.9, "weight_decay": 5e-4}), ("adamw", {"weight_decay": 0.05})):
            for dtype in (None, torch.float16, torch.bfloat16):
                head = PartialFC(margins.ArcFace(scale=16.0, margin=0.5), DIM, 64, rate, ctx.group, seed=1, validate=False).to(ctx.device)
                opt = head.optimizer(optimizer, lr=0.1, **hyper)
                x = torch.randn(8, DIM, device=ctx.device, requires_grad=True)
                labels = torch.randint(0, 64, (2, 8), device=ctx.device)
                for i in range(2):
                    if i == 1:
                        torch.cuda.set_sync_debug_mode("error")
                    try:
                        with torch.autocast(ctx.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                            loss = head(x, labels[i])
                        loss.backward()
                        opt.step()
                        opt.zero_grad()
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
                    x.grad = None
                assert torch.isfinite(loss).item()
                done.append(f"{rate} {optimizer} {dtype}")
    return done


def test_the_step_makes_no_host_sync() -> None:
    done = run_ranks(_sync_free_steps, 1)[0]
    assert len(done) == 12


@pytest.mark.parametrize("rate", [1.0, 0.0])  # dense rows, and the gathered rows of the positives (same on both)
@pytest.mark.parametrize("optimizer, hyper", [
    ("sgd", {"lr": 0.3, "momentum": 0.9, "weight_decay": 5e-4}),
    ("adamw", {"lr": 0.05, "betas": (0.9, 0.99), "weight_decay": 0.05}),
])
def test_row_optimizers_on_cuda_equal_the_cpu_ones(rate: float, optimizer: str, hyper: dict[str, Any]) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    results = {}
    for device in ("cpu", "cuda"):
        head = PartialFC(margins.CosFace(scale=16.0, margin=0.3), DIM, NUM_CLASSES, rate, None, seed=SEED).to(device)
        opt = head.optimizer(optimizer, **hyper)
        x_all, labels_all = global_batch(2)
        for step in range(3):
            x = (x_all * (1 + 0.2 * step)).to(device).requires_grad_(True)
            head(x, labels_all.to(device)).backward()
            opt.step()
            opt.zero_grad()
        state = opt.state[head.weight]
        results[device] = [head.weight.detach().cpu()] + [state[k].cpu() for k in sorted(state) if state[k].dim() == 2]
    assert len(results["cpu"]) == (2 if optimizer == "sgd" else 3)
    for cpu, cuda in zip(results["cpu"], results["cuda"]):
        torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-6)



def _host_prefetch_vs_device(ctx: Any) -> list[tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]]]:
    """Host-resident W whose rows are prefetched on the side stream vs W on the GPU, no prefetch."""
    from test_head_prefetch import train_steps

    out = []
    for dtype, autocast in (("fp32", None), ("bf16", torch.bfloat16)):
        on_gpu = train_steps(ctx, (0.5, dtype, None, autocast), False, num_classes=64, batch=8)
        on_host = train_steps(ctx, (0.5, dtype, "cpu", autocast), True, num_classes=64, batch=8)
        out.append(((dtype, autocast), on_gpu, on_host))
    return out


def test_host_resident_rows_prefetched_on_a_side_stream_equal_device_resident_ones() -> None:
    from test_head_prefetch import assert_same_run

    torch.backends.cuda.matmul.allow_tf32 = False
    for case, on_gpu, on_host in run_ranks(_host_prefetch_vs_device, 1)[0]:
        assert_same_run(on_gpu, on_host, case)
