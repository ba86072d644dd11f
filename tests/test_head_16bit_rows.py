"""16-bit W under autocast in the same dtype: the sampled rows are gathered in 16 bits and feed the GEMMs
as they are (no fp32 copy, no low-precision copy). The step must equal an fp32 head holding the same
(16-bit representable) values under the same autocast, and only the rows buffer's dtype differs."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from largefr import PartialFC, margins
from largefr.heads.sharded_softmax import compute_rows_dtype
from multirank import run_ranks
from reference import ALL_MARGINS

NUM_CLASSES, DIM, BATCH, SEED = 29, 16, 6, 3
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CASE_MARGINS = [ALL_MARGINS[0], ALL_MARGINS[6], margins.SubCenterArcFace(16.0, 0.5, 3)]


def test_rows_dtype_follows_storage_only_when_the_gemms_run_in_it() -> None:
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert compute_rows_dtype(bf16, bf16) == bf16 and compute_rows_dtype(fp16, fp16) == fp16
    assert compute_rows_dtype(bf16, None) == fp32 and compute_rows_dtype(bf16, fp16) == fp32
    assert compute_rows_dtype(fp32, bf16) == fp32


def _slot_dtypes(head: PartialFC) -> dict[str, torch.dtype]:
    return {name: tensor.dtype for name, (tensor, _) in head._workspace._slots.items()}


def _one_step(head: PartialFC, x: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
    opt = head.optimizer("sgd", lr=0.2, momentum=0.9, weight_decay=1e-3)
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        loss = head(x, labels)
    loss.backward()
    grad = head.row_grad().grad.clone()
    slots = _slot_dtypes(head)
    opt.step()
    return dict(loss=loss.detach(), x_grad=x.grad, w_grad=grad, ids=head.sampled_class_ids.clone(),
                slots=slots, after=head.weight.detach().float().clone())


def _compare_cases(ctx: Any) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(11 + ctx.world_size)
    x_all = torch.randn(ctx.world_size * BATCH, DIM, generator=gen)
    labels_all = torch.randint(0, NUM_CLASSES, (ctx.world_size * BATCH,), generator=gen)
    rows = slice(ctx.rank * BATCH, (ctx.rank + 1) * BATCH)
    out = []
    for index, margin in enumerate(CASE_MARGINS):
        for rate in (1.0, 0.5):
            for name, dtype in DTYPES.items():
                low = PartialFC(margin, DIM, NUM_CLASSES, rate, ctx.group, seed=SEED, weight_dtype=name)
                full = PartialFC(margin, DIM, NUM_CLASSES, rate, ctx.group, seed=SEED)
                full.weight.data.copy_(low.weight.detach().float())  # the same values, held in fp32
                results = [_one_step(h, x_all[rows], labels_all[rows], dtype) for h in (low, full)]
                out.append(dict(case=(index, rate, name), low=results[0], full=results[1]))
    return out


@pytest.mark.parametrize("world_size", [1, 2])
def test_16bit_rows_equal_fp32_rows_holding_the_same_values(world_size: int) -> None:
    for per_rank in run_ranks(_compare_cases, world_size):
        for case in per_rank:
            low, full, (_, rate, name) = case["low"], case["full"], case["case"]
            dtype = DTYPES[name]
            assert torch.equal(low["ids"], full["ids"]), case["case"]
            torch.testing.assert_close(low["loss"], full["loss"], rtol=1e-6, atol=1e-7, msg=str(case["case"]))
            torch.testing.assert_close(low["x_grad"], full["x_grad"], rtol=1e-5, atol=1e-7, msg=str(case["case"]))
            torch.testing.assert_close(low["w_grad"], full["w_grad"], rtol=1e-5, atol=1e-7, msg=str(case["case"]))
            # memory: 16-bit gathered rows (r < 1) or W itself (r = 1), and no second low-precision copy
            assert "w_gemm" not in low["slots"] and full["slots"]["w_gemm"] == dtype, case["case"]
            if rate < 1.0:
                assert low["slots"]["w_rows"] == dtype, case["case"]
            else:
                assert "w_rows" not in low["slots"], case["case"]
            # the update ran in fp32 and was rounded to one of the two 16-bit neighbours
            spacing = torch.finfo(dtype).eps * full["after"].abs().clamp_min(torch.finfo(dtype).tiny)
            assert ((low["after"] - full["after"]).abs() <= spacing * 1.001 + 1e-7).all(), case["case"]


def test_16bit_rows_without_matching_autocast_are_refused() -> None:
    from largefr.heads.sharded_softmax import _operands, ShardedSoftmaxSpec  # noqa: PLC2701 (the contract itself)
    from largefr.heads.workspace import Workspace

    spec = ShardedSoftmaxSpec(group=None, num_rows=2, normalize_weight=True, target_fn=lambda *a: a[2],
                              chunk_rows=None, workspace=Workspace(), grad_sink=lambda *a: None)
    x, rows = torch.randn(2, 4), torch.randn(3, 4).bfloat16()
    with pytest.raises(TypeError, match="W rows in torch.bfloat16 need autocast in that dtype"):
        _operands(x, x, rows, spec, None, {})
