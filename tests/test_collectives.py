"""The object and flag collectives of largefr.distributed on 3 gloo ranks, and their world-of-one shortcuts."""
from typing import Any

import pytest
import torch

from largefr.distributed import all_gather_objects, all_reduce_max_, barrier, broadcast_object, global_rank
from multirank import run_ranks


def _collect(ctx: Any) -> dict[str, Any]:
    barrier(ctx.group)
    flag = torch.tensor(float(ctx.rank == 1))
    return {
        "max": float(all_reduce_max_(flag, ctx.group)),
        "from_rank2": broadcast_object({"rank": ctx.rank}, ctx.group, src=2),
        "gathered": all_gather_objects(("r", ctx.rank), ctx.group),
        "global_rank": global_rank(ctx.group),
    }


@pytest.mark.slow
def test_object_collectives_on_three_ranks() -> None:
    for rank, got in enumerate(run_ranks(_collect, 3)):
        assert got == {"max": 1.0, "from_rank2": {"rank": 2}, "gathered": [("r", 0), ("r", 1), ("r", 2)],
                       "global_rank": rank}


def test_no_group_means_one_process() -> None:
    flag = torch.tensor(3.0)
    assert all_reduce_max_(flag, None) is flag and float(flag) == 3.0
    assert broadcast_object([1], None) == [1] and all_gather_objects("x", None) == ["x"] and global_rank(None) == 0
    barrier(None)
