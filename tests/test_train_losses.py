"""The loss section in training: a pure triplet run (P x K batches, no head, no head optimizer) and
margin softmax + centre loss, whose sharded centres are checkpointed and resharded from 2 ranks to 1."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from largefr.config import ConfigError, load_config
from largefr.distributed import DistContext
from largefr.train.build import build_parts, build_train_loader, resolve_dataset, steps_per_epoch
from largefr.train.checkpoint import latest_checkpoint
from largefr.train.objective import center_of
from largefr.train.run import train
from largefr.train.state import resume
from multirank import run_ranks

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synthetic_cpu.yaml"
STEPS = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from largefr.data.synth import SynthSpec
    from largefr.data.synth_dataset import write_synthetic_dataset

    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(out, SynthSpec(identities=12, per_identity=4, seed=3), workers=1, progress=False)
    return out


def overrides(dataset: Path, out: Path, loss: str, pk: bool) -> list[str]:
    sets = [
        f"data.path={dataset}", "data.num_workers=0", f"output_dir={out}", "model.kwargs={base_width: 4}",
        "head.embedding_size=16", "train.batch_size=4", "train.precision=fp32", "train.eval_bins=[]",
        f"schedule.total_steps={STEPS}", "schedule.warmup_steps=1", "logging.console=false", f"loss={loss}",
    ]
    return sets + (["data.sampler=pk", "data.images_per_identity=2"] if pk else [])


def _runs(ctx: Any, dataset: str, out: str) -> dict[str, Any]:
    root = Path(out)
    triplet = load_config(CONFIG, overrides(Path(dataset), root / "triplet", "{type: triplet, margin: 0.3, mining: batch_all}", True))
    train(triplet, ctx)
    joint_sets = overrides(Path(dataset), root / "joint", "[{type: margin_softmax}, {type: center, weight: 0.01, alpha: 0.5}]", False)
    train(load_config(CONFIG, joint_sets), ctx)
    result: dict[str, Any] = {}
    solo_group = dist.new_group([0])
    if ctx.rank == 0:  # the 2-rank checkpoint resumed by one rank: the centres reshard like W
        solo = DistContext(0, 1, 0, ctx.backend, ctx.device, solo_group)
        cfg, manifest = resolve_dataset(load_config(CONFIG, joint_sets))
        loader = build_train_loader(cfg, solo, manifest)
        parts = build_parts(cfg, solo, steps_per_epoch(loader, 1))
        resume(parts, loader, latest_checkpoint(cfg.checkpoint_dir))
        centre = center_of(parts.objective)
        assert centre is not None
        result["centres_at_world_1"] = centre.centers.clone()
    dist.barrier(group=ctx.group)
    return result


@pytest.mark.slow
def test_triplet_alone_and_centre_loss_train_and_reshard(dataset: Path, tmp_path: Path) -> None:
    per_rank = run_ranks(_runs, 2, str(dataset), str(tmp_path))
    flat = {}
    for name in ("triplet", "joint"):
        path = latest_checkpoint(tmp_path / name / "checkpoints")
        assert path is not None and path.name.endswith(f"{STEPS:08d}")
        dcp_to_torch_save(path, tmp_path / f"{name}.pt")
        flat[name] = torch.load(tmp_path / f"{name}.pt", weights_only=False)
    assert not {"head", "head_optim", "head_rng", "center"} & set(flat["triplet"]), "a triplet run has no head"
    assert {"head", "head_optim", "center"} <= set(flat["joint"])
    centres = flat["joint"]["center"]["centers"]
    assert centres.shape == (12, 16) and int((centres.abs().sum(1) > 0).sum()) >= 4, "centres were updated"
    torch.testing.assert_close(per_rank[0]["centres_at_world_1"], centres, rtol=0, atol=0)
    metrics = (tmp_path / "triplet" / "metrics.jsonl").read_text()
    assert "triplet/active_fraction" in metrics


def test_wrong_combinations_are_config_errors(tmp_path: Path) -> None:
    base = [f"output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="data.sampler.*needs positives"):
        load_config(CONFIG, [*base, "loss={type: contrastive}"])
    with pytest.raises(ConfigError, match="'center' term needs a 'margin_softmax'"):
        load_config(CONFIG, [*base, "loss=[{type: center, weight: 0.003}]"])
    with pytest.raises(ConfigError, match=r"loss\[0\].mining.*takes only"):
        load_config(CONFIG, [*base, "loss={type: contrastive, mining: batch_hard}", "data.sampler=pk"])
    with pytest.raises(ConfigError, match="K >= 2"):
        load_config(CONFIG, [*base, "data.sampler=pk", "data.images_per_identity=1"])
    with pytest.raises(ConfigError, match="P=3 x K=4"):
        load_config(CONFIG, [*base, "data.sampler=pk", "data.identities_per_batch=3"])
    cfg = load_config(CONFIG, [*base, "loss={type: triplet}", "data.sampler=pk"])
    assert [(t.type, t.margin, t.mining) for t in cfg.loss] == [("triplet", 0.2, "semi_hard")]
