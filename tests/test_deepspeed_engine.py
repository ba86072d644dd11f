"""``train.engine: deepspeed`` (ZeRO-1/2 on 2 gloo ranks, DS_ACCELERATOR=cpu, torch optimizers).

1. Gradient semantics, as tests/test_train_step.py for DDP: ZeRO-1 and ZeRO-2 on 2 ranks x 2 images (with
   without clipping, and with active clipping and 2 micro-batches) make the update of DDP on 1 rank x 4
   images: backbone and global W within 1e-4 (fp32 on CPU; BatchNorm in eval mode, see that module).
   The engine's default (mean) reduction does not: the SUM setting is what makes it right.
2. The head stays outside the engine: each rank's W slice right after engine initialisation is exactly
   the seeded global W's rows of its class range (not rank 0's), and after training matches DDP's W.
3. The loss trajectory over 20 steps in training mode (BatchNorm batch statistics, clipping active):
   ZeRO-1 and ZeRO-2 equal DDP on the same 2 ranks within rel 1e-4 (float reduction order differs:
   ZeRO flattens the parameters and clips with a norm over its partitions).
4. Checkpoints through ``train()``: N steps, processes gone, resumed in fresh processes, M steps ==
   N + M steps, bit for bit (DCP items and every tensor of the engine's own files); the 2-rank checkpoint
   resumed on 1 rank: head W resharded, backbone and its ZeRO optimizer state (elastic) as saved.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from largefr.config import ConfigError, DeepSpeedConfig, config_from_dict, load_config
from largefr.distributed import DistContext
from largefr.heads.sampling import init_weight_rows
from largefr.train import deepspeed_engine
from largefr.train.build import build_parts
from largefr.train.checkpoint import completed_checkpoints, latest_checkpoint
from largefr.backbone_file import read_meta_json as read_meta
from largefr.train.deepspeed_engine import ENGINE_TAG, deepspeed_config
from largefr.train.step import train_step
from multirank import run_ranks
from test_train_resume import assert_identical, flat_checkpoint, overrides, train_runs
from test_train_step import CLIP, GLOBAL_BATCH, NUM_CLASSES, assert_same_training, global_batches, tiny_config

TRAJECTORY_STEPS = 20
N_STEPS, TOTAL_STEPS = 5, 11


def with_engine(cfg: Any, stage: int | None) -> Any:
    """``cfg`` with train.engine=deepspeed at ZeRO ``stage`` (None: DDP)."""
    if stage is None:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, engine="deepspeed"),
                               deepspeed=DeepSpeedConfig(stage=stage))


# ---------------------------------------------------------------------------------- config (no ranks)


def test_generated_config_sums_and_carries_largefr_settings():
    cfg = tiny_config(grad_accum=2, clip_grad_norm=CLIP)
    ds = deepspeed_config(with_engine(cfg, 2), world_size=4)
    assert ds["gradient_allreduce_op"] == "sum" and ds["zero_optimization"]["stage"] == 2
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        cfg.train.batch_size, 2, cfg.train.batch_size * 2 * 4)
    assert ds["gradient_clipping"] == CLIP
    assert "optimizer" not in ds and "scheduler" not in ds  # largefr's torch optimizer and schedule


def test_override_file_merges_and_refuses_what_breaks_the_contracts(tmp_path: Path):
    cfg = with_engine(tiny_config(), 1)
    file = tmp_path / "ds.json"
    file.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}}))
    ds = deepspeed_config(dataclasses.replace(cfg, deepspeed=DeepSpeedConfig(stage=1, config=str(file))), 2)
    assert ds["zero_optimization"] == {"stage": 1, "elastic_checkpoint": True, "reduce_bucket_size": 1000}
    for bad, words in [({"gradient_allreduce_op": "mean"}, "gradient_allreduce_op"),
                       ({"zero_optimization": {"stage": 3}}, "stage"),
                       ({"optimizer": {"type": "Adam"}}, "optim.backbone"),
                       ({"fp16": {"enabled": True}}, "fp16"),
                       ({"train_batch_size": 7}, "train_batch_size")]:
        file.write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match=words):
            deepspeed_config(dataclasses.replace(cfg, deepspeed=DeepSpeedConfig(stage=1, config=str(file))), 2)


def test_bad_engine_settings_are_config_errors():
    with pytest.raises(ConfigError, match="deepspeed.stage.*1 or 2"):
        config_from_dict({"deepspeed": {"stage": 3}})
    with pytest.raises(ConfigError, match="train.engine"):
        config_from_dict({"train": {"engine": "fsdp"}})
    with pytest.raises(ConfigError, match="train.precision.*fp16"):
        deepspeed_config(with_engine(tiny_config(precision="fp16"), 1), 2)


# ------------------------------------------------------------------------------------- on 2 ranks


def train_split(ctx: DistContext, cfg: Any, accum: int) -> dict:
    """As test_train_step.run_split, for any engine: 3 steps of this rank's share, BN in eval mode."""
    parts = build_parts(cfg, ctx, steps_per_epoch=10)
    start, stop = parts.head.class_range
    seeded = init_weight_rows(0, NUM_CLASSES, cfg.head.embedding_size, cfg.train.seed)[start:stop]
    slice_kept = torch.equal(parts.head.weight.detach(), seeded.to(parts.head.weight.device))
    parts.ddp.eval()
    per_rank = GLOBAL_BATCH // ctx.world_size
    losses = []
    for images, labels in global_batches():
        mine = slice(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)
        x, y = images[mine], labels[mine]
        losses.append(float(train_step(parts, [(x[i::accum], y[i::accum]) for i in range(accum)]).loss))
    return {"backbone": {k: v.clone() for k, v in parts.model.state_dict().items()},
            "weight": parts.head.weight.detach().clone(), "class_range": (start, stop), "losses": losses,
            "slice_kept_at_init": slice_kept}


DS_SPLITS = [(1, 1, None), (2, 2, CLIP)]  # (stage, grad_accum, clip)


def mean_reduction_run(ctx: DistContext) -> dict:
    """ZeRO-1 with DeepSpeed's default (mean) gradient reduction: must NOT match."""
    generated = deepspeed_engine.deepspeed_config
    deepspeed_engine.deepspeed_config = lambda cfg, world: {**generated(cfg, world), "gradient_allreduce_op": "mean"}
    try:
        return train_split(ctx, with_engine(tiny_config(clip_grad_norm=None), 1), 1)
    finally:
        deepspeed_engine.deepspeed_config = generated


def trajectory(ctx: DistContext, stage: int | None) -> list[float]:
    """20 steps in training mode on one fixed random batch (2 images per rank), clipping active."""
    parts = build_parts(with_engine(tiny_config(clip_grad_norm=CLIP), stage), ctx, steps_per_epoch=10)
    parts.ddp.train()
    g = torch.Generator().manual_seed(5)
    # one fixed batch of uint8 images (the loaders' output), so that the loss must fall as it is fitted
    images = torch.randint(0, 256, (GLOBAL_BATCH, 3, 112, 112), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (GLOBAL_BATCH,), generator=g)
    mine = slice(ctx.rank * 2, ctx.rank * 2 + 2)
    losses = []
    for _ in range(TRAJECTORY_STEPS):
        losses.append(float(train_step(parts, [(images[mine], labels[mine])]).loss))
    return losses


def everything_on_two_ranks(ctx: DistContext, dataset: Path, root: Path) -> dict:
    """One spawn: the step-semantics runs, the trajectories, and the first two train() runs."""
    out: dict[str, Any] = {"ds": {split: train_split(ctx, with_engine(tiny_config(grad_accum=split[1], clip_grad_norm=split[2]), split[0]), split[1])
                                  for split in DS_SPLITS}}
    out["mean"] = mean_reduction_run(ctx)
    out["trajectory"] = {stage: trajectory(ctx, stage) for stage in (None, 1, 2)}
    solo_group = dist.new_group([0])
    if ctx.rank == 0:  # the 1-rank DDP reference (DeepSpeed runs over the default group only)
        solo = DistContext(0, 1, 0, ctx.backend, ctx.device, solo_group)
        out["one"] = {clip: train_split(solo, tiny_config(clip_grad_norm=clip), 1) for clip in (None, CLIP)}
    dist.barrier(group=ctx.group)
    train_runs(ctx, [(e2e_overrides(dataset, root / "whole"), None), (e2e_overrides(dataset, root / "split"), N_STEPS)])
    return out


def e2e_overrides(dataset: Path, output_dir: Path) -> list[str]:
    return [*overrides(dataset, output_dir), "train.engine=deepspeed", "deepspeed.stage=2",
            f"schedule.total_steps={TOTAL_STEPS}"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from largefr.data.synth import SynthSpec
    from largefr.data.synth_dataset import write_synthetic_dataset

    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(out, SynthSpec(identities=8, per_identity=4, seed=3), workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def results(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    root = tmp_path_factory.mktemp("ds_runs")
    return run_ranks(everything_on_two_ranks, 2, dataset, root, timeout_s=600), root


@pytest.mark.slow
def test_zero_sums_gradients_like_ddp(results):
    ranks, _ = results
    one = ranks[0]["one"]
    for split in DS_SPLITS:
        stage, accum, clip = split
        assert_same_training(one[clip], [r["ds"][split] for r in ranks], f"ZeRO-{stage}, accum {accum}, clip {clip}")
    averaged = ranks[0]["mean"]["backbone"]
    assert max((averaged[k] - one[None]["backbone"][k]).abs().max().item() for k in averaged) > 1e-3


@pytest.mark.slow
def test_each_rank_keeps_its_own_head_slice(results):
    ranks, _ = results
    for split in DS_SPLITS:
        assert all(r["ds"][split]["slice_kept_at_init"] for r in ranks), split
        assert ranks[0]["ds"][split]["class_range"] != ranks[1]["ds"][split]["class_range"]


@pytest.mark.slow
def test_zero_loss_trajectory_equals_ddp(results):
    ranks, _ = results
    ddp = ranks[0]["trajectory"][None]
    assert ddp[-1] < ddp[0]  # it trains
    for stage in (1, 2):
        assert ranks[0]["trajectory"][stage] == pytest.approx(ddp, rel=1e-4), f"ZeRO-{stage}"
        assert ranks[1]["trajectory"][stage] == ranks[0]["trajectory"][stage]  # one global loss


def engine_tensors(step_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor in the engine's files, by file and key path."""
    out: dict[str, torch.Tensor] = {}

    def walk(value: Any, where: str) -> None:
        if isinstance(value, torch.Tensor):
            out[where] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}.{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")

    for file in sorted((step_dir / ENGINE_TAG).glob("*.pt")):
        walk(torch.load(file, map_location="cpu", weights_only=False), file.name)
    return out


@pytest.fixture(scope="module")
def resumed(results, dataset: Path) -> Path:
    _, root = results
    stopped = latest_checkpoint(root / "split" / "checkpoints")
    assert stopped is not None and read_meta(stopped)["step"] == N_STEPS and read_meta(stopped)["engine"] == "deepspeed"
    run_ranks(train_runs, 2, [(e2e_overrides(dataset, root / "split"), None)])  # fresh processes, auto-resume
    return root


@pytest.mark.slow
def test_deepspeed_resume_continues_exactly(resumed: Path, tmp_path: Path):
    a, b = latest_checkpoint(resumed / "whole" / "checkpoints"), latest_checkpoint(resumed / "split" / "checkpoints")
    assert read_meta(a)["step"] == read_meta(b)["step"] == TOTAL_STEPS
    flat_a, flat_b = flat_checkpoint(a, tmp_path), flat_checkpoint(b, tmp_path)
    assert "backbone_optim" not in flat_a  # the engine's files hold it
    assert_identical(flat_a, flat_b)
    tensors_a, tensors_b = engine_tensors(a), engine_tensors(b)
    assert len(tensors_a) > 10 and tensors_a.keys() == tensors_b.keys()
    assert_identical(tensors_a, tensors_b)


def resume_on_one_rank(ctx: DistContext, dataset: Path, checkpoint: Path, output_dir: Path) -> dict:
    from largefr.train.build import build_train_loader, resolve_dataset, steps_per_epoch
    from largefr.train.state import resume

    config = Path(__file__).resolve().parents[1] / "configs" / "synthetic_cpu.yaml"
    cfg, manifest = resolve_dataset(load_config(config, e2e_overrides(dataset, output_dir)))
    loader = build_train_loader(cfg, ctx, manifest)
    parts = build_parts(cfg, ctx, steps_per_epoch(loader, cfg.train.grad_accum))
    progress = resume(parts, loader, checkpoint)
    zero = parts.engine.optimizer
    state = zero.optimizer.state[zero.single_partition_of_fp32_groups[0]]
    trained = [p for p in parts.model.parameters() if p.requires_grad]  # what ZeRO flattens, in order
    numel = sum(p.numel() for p in trained)
    return {"step": progress.step, "weight": parts.head.weight.detach().clone(),
            "backbone": {k: v.clone() for k, v in parts.model.state_dict().items()},
            "master": zero.single_partition_of_fp32_groups[0].detach()[:numel].clone(),
            "flat_params": torch.cat([p.detach().reshape(-1) for p in trained]),
            "exp_avg": state["exp_avg"][:numel].clone()}


@pytest.mark.slow
def test_two_rank_checkpoint_reshards_onto_one_rank(resumed: Path, dataset: Path, tmp_path: Path):
    start = [p for s, p in completed_checkpoints(resumed / "split" / "checkpoints") if s == TOTAL_STEPS][0]
    (one,) = run_ranks(resume_on_one_rank, 1, dataset, start, tmp_path / "one")
    flat = flat_checkpoint(start, tmp_path)
    assert one["weight"].shape[0] == 8 and torch.equal(one["weight"], flat["head"]["weight"])
    assert_identical(one["backbone"], flat["backbone"])
    assert torch.equal(one["master"], one["flat_params"])  # ZeRO's fp32 master == the module
    saved = [torch.load(start / ENGINE_TAG / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", weights_only=False)
             for r in range(2)]
    halves = [s["optimizer_state_dict"]["base_optimizer_state"][0]["exp_avg"] for s in saved]
    assert torch.equal(one["exp_avg"], torch.cat(halves)[: one["exp_avg"].numel()])
