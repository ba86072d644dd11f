"""The memory planner's head terms equal the bytes the head actually allocates."""
from __future__ import annotations

import pytest
import torch

from largefr import PartialFC, margins
from largefr.memory_plan import PlanInput, head_workspace_bytes, plan_memory, sampled_rows


@pytest.mark.parametrize(
    "rate, precision, chunk", [(1.0, "fp32", None), (0.5, "fp32", None), (0.3, "bf16", 3), (0.05, "fp32", None)]
)
def test_head_terms_match_allocations(rate: float, precision: str, chunk: int | None) -> None:
    num_classes, dim, batch = 40, 8, 8
    inp = PlanInput(num_classes, dim, world_size=1, batch_size=batch, sample_rate=rate, precision=precision,
                    chunk_rows=chunk, head_optimizer="adamw")
    head = PartialFC(margins.CosFace(scale=8.0), dim, num_classes, rate, chunk_rows=chunk)
    opt = head.optimizer("adamw", lr=1e-3)
    labels = torch.arange(batch) * 5  # distinct positives: the planner's worst case for small r
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = head(torch.randn(batch, dim), labels)
    loss.backward()
    opt.step()
    plan = plan_memory(inp)
    assert head.sampled_class_ids.numel() == sampled_rows(inp)
    assert plan.terms["head: W slice"] == head.weight.numel() * 4
    state = opt.state[head.weight]
    assert plan.terms["head: optimizer state"] == sum(t.nbytes for t in state.values() if t.dim() > 0)
    assert sum(head_workspace_bytes(inp).values()) == head._workspace.nbytes()


def test_backbone_terms_and_errors() -> None:
    plan = plan_memory(PlanInput(1000, 64, world_size=2, batch_size=2, backbone="mobilefacenet"))
    with torch.device("meta"):
        from largefr.models import build_backbone

        params = sum(p.numel() for p in build_backbone("mobilefacenet", 64).parameters())
    assert plan.terms["backbone: parameters"] == params * 4
    assert plan.terms["backbone: activations"] > 2 * 3 * 112 * 112 * 4  # at least the saved input
    with pytest.raises(ValueError, match="chunk_rows"):
        PlanInput(10, chunk_rows=-5000)
    with pytest.raises(ValueError, match="sample_rate"):
        PlanInput(10, sample_rate=2.0)
    with pytest.raises(ValueError, match="head_optimizer"):
        PlanInput(10, head_optimizer="lamb")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_terms_predict_another_batch_size(precision: str) -> None:
    # weights saved by autograd are counted once (as parameters / autocast copies), not per image
    from largefr.memory_plan import _saved_bytes

    plan = plan_memory(PlanInput(1000, 64, batch_size=6, backbone="mobilefacenet", precision=precision))
    constant = plan.terms.get("backbone: batch-independent saved tensors", 0)
    predicted = plan.terms["backbone: activations"] + constant
    assert abs(predicted - _saved_bytes("mobilefacenet", 64, 112, precision, 6)) <= 0.02 * predicted
    weights = plan.terms["backbone: parameters"]  # fp32 bytes
    if precision == "bf16":  # the bf16 weight copies autocast keeps for backward
        assert 0.4 * weights <= constant <= 0.6 * weights
    else:
        assert constant < 0.1 * weights
