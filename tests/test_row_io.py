"""The row gather and scatter that move sampled W / optimizer-state rows (largefr.heads.weight_store)."""
from __future__ import annotations

import pytest
import torch

from largefr.heads.weight_store import gather_rows, scatter_rows

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _table(rows: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(rows + dim)).to(dtype)


@pytest.mark.parametrize("dim", [3, 8, 512])  # 3: rows are no whole number of 64-bit words
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_rows_equals_indexing(dtype: torch.dtype, dim: int) -> None:
    full, ids = _table(1000, dim, dtype), torch.tensor([999, 0, 17, 500, 3])
    assert torch.equal(gather_rows(full, ids), full[ids])
    out = torch.empty(5, dim, dtype=dtype)
    assert gather_rows(full, ids, out) is out and torch.equal(out, full[ids])
    strided_out = torch.empty(dim, 5, dtype=dtype).t()  # element by element into a strided buffer
    assert torch.equal(gather_rows(full, ids, strided_out), full[ids])


@pytest.mark.parametrize("dim", [3, 512])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scatter_rows_on_the_host_equals_index_copy(dtype: torch.dtype, dim: int) -> None:
    full, ids = _table(1000, dim, dtype), torch.tensor([999, 0, 17, 500, 3])
    rows = torch.randn(5, dim).to(dtype)
    expected = full.clone().index_copy_(0, ids, rows)
    scatter_rows(full, ids, rows)
    assert torch.equal(full.view(torch.uint8), expected.view(torch.uint8))  # the same bits (NaN-safe)
    # a strided source: the high halves of int32 values, as bf16 stochastic rounding hands them over
    words = torch.randint(-(2**31), 2**31 - 1, (5, dim), dtype=torch.int32)
    halves = words.view(torch.int16).unflatten(-1, (-1, 2))[..., 1].view(torch.bfloat16)
    table = _table(1000, dim, torch.bfloat16)
    expected = table.clone().index_copy_(0, ids, halves)
    scatter_rows(table, ids, halves)
    assert torch.equal(table.view(torch.int16), expected.view(torch.int16))


def test_scatter_rows_rejects_rows_that_do_not_fit() -> None:
    full, ids = _table(10, 4, torch.float32), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"rows torch.bfloat16 \(2, 4\) do not fit 2 rows of torch.float32"):
        scatter_rows(full, ids, torch.zeros(2, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"\(3, 4\) do not fit 2 rows"):
        scatter_rows(full, ids, torch.zeros(3, 4))


def test_scatter_rows_off_the_host_uses_index_copy() -> None:
    full = torch.empty(10, 4, device="meta")  # the planner's dry run: shapes only
    scatter_rows(full, torch.tensor([1, 2], device="meta"), torch.empty(2, 4, device="meta"))
    with pytest.raises(RuntimeError):
        scatter_rows(full, torch.tensor([1, 2], device="meta"), torch.empty(2, 5, device="meta"))
