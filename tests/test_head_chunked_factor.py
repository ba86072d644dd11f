"""Chunked logits under 16-bit autocast keep the W gradient as G [N, R] in the GEMMs' dtype when that is
smaller than a summed [R, D] fp32 gradient (2N < 4D). G is cast to that dtype for the GEMM G^T x in the
unchunked head too, so the chunked step must give the unchunked gradients bit for bit (the loss only
differs by the order of its fp32 sum over chunks), on 1 and 2 ranks, for every kind of margin."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from largefr import PartialFC, margins as M
from largefr.heads.factored_grad import keeps_low_precision_factor
from multirank import run_ranks

NUM_CLASSES, BATCH, SEED = 37, 6, 1
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# a plain margin, a sub-centre one (G spans S*K rows), a non-target transform, per-row margin constants
CASE_MARGINS = [M.ArcFace(16.0, 0.5), M.SubCenterArcFace(16.0, 0.5, 3), M.CurricularFace(16.0, 0.5), M.AdaFace(16.0)]


def test_the_smaller_gradient_form_is_chosen() -> None:
    assert keeps_low_precision_factor(512, 512, torch.float16)  # 8 x 64 per GPU: 1 KiB per row instead of 2
    assert keeps_low_precision_factor(1023, 512, torch.bfloat16)
    assert not keeps_low_precision_factor(1024, 512, torch.bfloat16)  # equal bytes: the summed fp32 gradient
    assert not keeps_low_precision_factor(8, 512, None) and not keeps_low_precision_factor(8, 512, torch.float32)


def _step(margin: M.Margin, dim: int, rate: float, chunk: int | None, dtype: torch.dtype, ctx: Any) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(5 + ctx.world_size)
    x_all = torch.randn(ctx.world_size * BATCH, dim, generator=gen) * 2
    labels_all = torch.randint(0, NUM_CLASSES, (ctx.world_size * BATCH,), generator=gen)
    rows = slice(ctx.rank * BATCH, (ctx.rank + 1) * BATCH)
    head = PartialFC(margin, dim, NUM_CLASSES, rate, ctx.group, seed=SEED, chunk_rows=chunk)
    x = x_all[rows].clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        loss = head(x, labels_all[rows])
    loss.backward()
    slots = {name: tensor.dtype for name, (tensor, _) in head._workspace._slots.items()}
    return dict(loss=loss.detach(), x_grad=x.grad, w_grad=head.row_grad().grad.clone(), slots=slots)


def _cases(ctx: Any, dim: int) -> list[dict[str, Any]]:
    out = []
    for index, margin in enumerate(CASE_MARGINS):
        for rate in (1.0, 0.5):
            for name, dtype in DTYPES.items():
                whole, chunked = (_step(margin, dim, rate, chunk, dtype, ctx) for chunk in (None, 5))
                out.append(dict(case=(index, rate, name), whole=whole, chunked=chunked))
    return out


@pytest.mark.parametrize("world_size", [1, 2])
def test_chunked_16bit_factor_gives_the_unchunked_gradients(world_size: int) -> None:
    dim = 16  # N = 6 * world_size rows < 2 D: G in 16 bits is the smaller form
    for per_rank in run_ranks(_cases, world_size, dim):
        for case in per_rank:
            whole, chunked, name = case["whole"], case["chunked"], case["case"][2]
            torch.testing.assert_close(chunked["loss"], whole["loss"], rtol=1e-6, atol=1e-6, msg=str(case["case"]))
            assert torch.equal(chunked["x_grad"], whole["x_grad"]), case["case"]
            assert torch.equal(chunked["w_grad"], whole["w_grad"]), case["case"]
            assert chunked["slots"]["grad_factor"] == DTYPES[name] and "grad_w" not in chunked["slots"], case["case"]


def test_wide_batches_keep_the_summed_fp32_gradient() -> None:
    dim = 3  # N = 6 = 2 D: the [R, D] fp32 sum is no larger
    ctx = type("Ctx", (), {"world_size": 1, "rank": 0, "group": None})()
    chunked = _step(CASE_MARGINS[0], dim, 1.0, 5, torch.bfloat16, ctx)
    whole = _step(CASE_MARGINS[0], dim, 1.0, None, torch.bfloat16, ctx)
    assert chunked["slots"]["grad_w"] == torch.float32 and "grad_factor" not in chunked["slots"]
    # the same bf16 products, summed over chunks in fp32 rather than in one GEMM
    assert (chunked["w_grad"] - whole["w_grad"]).norm() <= 1e-2 * whole["w_grad"].norm()
