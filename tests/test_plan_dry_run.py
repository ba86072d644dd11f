"""The dry run (real head, optimizer and backbone on meta tensors, fake process group) allocates exactly
the bytes the planner predicts, per rank, uneven shards included."""
from __future__ import annotations

import pytest

from largefr.memory_plan import PlanInput
from largefr.plan_dry_run import dry_run, planned_terms


@pytest.mark.parametrize(
    "inp",
    [
        # 64 ranks x 100M classes (+37: uneven), bf16 W and momentum under bf16 autocast, head only
        PlanInput(100_000_037, 512, world_size=64, batch_size=128, sample_rate=0.1, precision="bf16", weight_dtype="bf16"),
        # uneven small layouts with a backbone, fp32 (the saved activations count exactly); iresnet has a frozen
        # parameter (the BN1d scale): no gradient, no optimizer state
        PlanInput(1003, 64, world_size=3, batch_size=2, sample_rate=1.0, backbone="mobilefacenet"),
        PlanInput(1003, 64, world_size=2, batch_size=2, sample_rate=1.0, backbone="iresnet18", backbone_optimizer="adamw"),
        # host-resident fp16 W with fp32 AdamW state, logits in chunks
        PlanInput(1001, 32, world_size=4, batch_size=3, sample_rate=0.5, head_optimizer="adamw", weight_dtype="fp16",
                  state_dtype="fp32", storage="host", chunk_rows=5),
        # 1B classes host-resident on 8 ranks, r = 0.1, fp16 autocast, logits in chunks: G kept in fp16
        PlanInput(1_000_000_000, 512, world_size=8, batch_size=64, sample_rate=0.1, precision="fp16", weight_dtype="fp16",
                  storage="host", chunk_rows=64),
        # sub-centre ArcFace (3 rows per class: W, rows, scores, best sub-centre), chunked, fp16; CurricularFace's slope
        PlanInput(100_003, 512, world_size=4, batch_size=64, sample_rate=0.1, precision="fp16", weight_dtype="fp16",
                  chunk_rows=100, margin="subcenter_arcface", margin_params=(("sub_centers", 3),)),
        PlanInput(100_003, 512, world_size=4, batch_size=64, sample_rate=0.1, margin="curricularface", center_loss=True),
    ],
    ids=["64x100M-bf16", "3-ranks-mobilefacenet", "2-ranks-iresnet18-adamw", "host-fp16-adamw-chunked", "8x1B-host-fp16-chunked",
         "4-ranks-subcenter-chunked", "4-ranks-curricularface-centre-loss"],
)
def test_dry_run_bytes_equal_the_planner_terms(inp: PlanInput) -> None:
    results = dry_run(inp)
    assert [r.rank for r in results] == [0, inp.world_size - 1]
    for result in results:
        device, host = planned_terms(inp, result.rank)
        assert result.terms == device, f"rank {result.rank}"
        assert result.host_terms == host, f"rank {result.rank}"
    first, last = results
    assert first.class_range[0] == 0 and last.class_range[1] == inp.num_classes
    rows = [r.class_range[1] - r.class_range[0] for r in results]
    assert rows[0] - rows[1] == (1 if inp.num_classes % inp.world_size else 0)


def test_dry_run_refuses_layouts_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="num_classes=3 must be >= world size 4"):
        dry_run(PlanInput(3, 8, world_size=4))
    with pytest.raises(ValueError, match="sample_rate 0.01"):
        dry_run(PlanInput(1000, 8, world_size=2, batch_size=8, sample_rate=0.01))
