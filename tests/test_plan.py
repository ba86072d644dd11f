"""The memory planner's head terms equal the bytes the head actually allocates."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from largefr import PartialFC, margins
from largefr.memory_plan import PlanInput, head_workspace_bytes, plan_memory, sampled_rows


@pytest.mark.parametrize(
    "rate, precision, chunk, weight_dtype, state_dtype, storage",
    [(1.0, "fp32", None, "fp32", None, "device"), (0.5, "fp32", None, "fp32", None, "device"),
     (0.3, "bf16", 3, "fp32", None, "device"), (0.05, "fp32", None, "fp32", None, "device"),
     (1.0, "fp32", None, "bf16", None, "device"), (0.5, "bf16", None, "fp16", "fp32", "host"),
     (1.0, "fp32", 5, "fp32", "bf16", "host")],
)
def test_head_terms_match_allocations(
    rate: float, precision: str, chunk: int | None, weight_dtype: str, state_dtype: str | None, storage: str
) -> None:
    num_classes, dim, batch = 40, 8, 8
    inp = PlanInput(num_classes, dim, world_size=1, batch_size=batch, sample_rate=rate, precision=precision,
                    chunk_rows=chunk, head_optimizer="adamw", weight_dtype=weight_dtype, state_dtype=state_dtype,
                    storage=storage)
    head = PartialFC(margins.CosFace(scale=8.0), dim, num_classes, rate, chunk_rows=chunk, weight_dtype=weight_dtype,
                     storage_device="cpu" if storage == "host" else None)
    opt = head.optimizer("adamw", lr=1e-3, state_dtype=state_dtype)
    labels = torch.arange(batch) * 5  # distinct positives: the planner's worst case for small r
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = head(torch.randn(batch, dim), labels)
    loss.backward()
    opt.step()
    plan = plan_memory(inp)
    assert head.sampled_class_ids.numel() == sampled_rows(inp)
    stored = plan.host_terms if storage == "host" else plan.terms
    assert (plan.host_terms == {}) == (storage == "device")
    assert stored["head: W slice"] == head.weight.nbytes
    state = opt.state[head.weight]
    assert stored["head: optimizer state"] == sum(t.nbytes for t in state.values() if t.dim() > 0)
    assert sum(head_workspace_bytes(inp).values()) == head._workspace.nbytes()


MARGIN_CASES = [(name, (("sub_centers", 3),) if name == "subcenter_arcface" else ()) for name in sorted(margins.MARGINS)]


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("name, params", [*MARGIN_CASES, ("arcface", (("interclass_filter", 0.2),))])
def test_every_margins_buffers_are_planned(name: str, params: tuple[tuple[str, float], ...], chunk: int | None) -> None:
    """Sub-centres (scores, best sub-centre, S x the rows) and a non-target transform's slope, slot by slot."""
    num_classes, dim, batch, rate = 40, 8, 8, 0.5
    inp = PlanInput(num_classes, dim, world_size=1, batch_size=batch, sample_rate=rate, precision="bf16",
                    chunk_rows=chunk, margin=name, margin_params=params)
    head = PartialFC(margins.build_margin(name, **dict(params)), dim, num_classes, rate, chunk_rows=chunk)
    opt = head.optimizer("sgd", lr=0.1, momentum=0.9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(torch.randn(batch, dim), torch.arange(batch) * 5)
    loss.backward()
    opt.step()
    assert inp.sub_centers == head.margin.num_sub_centers
    assert plan_memory(inp).terms["head: W slice"] == head.weight.nbytes
    assert sum(head_workspace_bytes(inp).values()) == head._workspace.nbytes()
    slots = head._workspace.slot_bytes()
    assert ("nontarget_slope" in slots) == inp.nontarget_slope == (name == "curricularface" or bool(params and name == "arcface"))
    assert ("sub_scores" in slots) == (name == "subcenter_arcface")


def test_centre_loss_centres_are_planned() -> None:
    from largefr.heads.center import ShardedCenterLoss

    inp = PlanInput(1003, 16, world_size=1, batch_size=4, center_loss=True)
    centre_loss = ShardedCenterLoss(1003, 16)
    centre_loss(torch.randn(4, 16), torch.arange(4))
    assert plan_memory(inp).terms["center loss: class centres"] == centre_loss.centers.nbytes
    assert "center loss: class centres" not in plan_memory(replace(inp, center_loss=False)).terms


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
    with pytest.raises(ValueError, match="weight_dtype"):
        PlanInput(10, weight_dtype="int8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="storage"):
        PlanInput(10, storage="disk")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown margin 'arcfcae'"):
        PlanInput(10, margin="arcfcae")
    with pytest.raises(ValueError, match="bad parameters"):
        PlanInput(10, margin="subcenter_arcface", margin_params=(("centres", 3),))


def test_max_classes_is_the_boundary_and_no_fit_is_an_error() -> None:
    from largefr.memory_plan import max_classes, parse_bytes

    base = PlanInput(8, 64, world_size=3, batch_size=4, sample_rate=0.1, weight_dtype="bf16", storage="host")
    budget = parse_bytes("64MiB")
    best = max_classes(base, budget, host_bytes=parse_bytes("1GiB"))
    assert plan_memory(replace(base, num_classes=best)).total <= budget < plan_memory(replace(base, num_classes=best + 3)).total
    device_only = replace(base, storage="device")
    best_device = max_classes(device_only, budget)
    assert best_device < best and plan_memory(replace(device_only, num_classes=best_device + 1)).total > budget
    host_bound = max_classes(base, budget, host_bytes=parse_bytes("1MiB"))  # now the host memory binds
    assert plan_memory(replace(base, num_classes=host_bound)).host_total <= 2**20 < plan_memory(replace(base, num_classes=host_bound + 1)).host_total
    with pytest.raises(ValueError, match="fits no layout"):
        max_classes(base, 1000)
    with pytest.raises(Exception, match="32 gigs"):
        parse_bytes("32 gigs")
    assert parse_bytes("32GiB") == 32 * 2**30 and parse_bytes("2TB") == 2 * 10**12


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
