"""Sharded, atomic, reshardable training checkpoints with torch.distributed.checkpoint (DCP).

Layout of ``<ckpt_root>/step_NNNNNNNN/``: DCP files (``.metadata`` is written last by DCP, so a
directory holding it is complete), plus on rank 0 ``backbone.pt`` (plain backbone state_dict),
``meta.json`` and any ``extra_files`` (e.g. ``config.yaml``). Each save goes to ``step_NNNNNNNN.tmp/``
and is renamed by rank 0 once every rank has written, so a crash mid-save leaves earlier checkpoints
loadable and :func:`latest_checkpoint` never returns a partial one.

What each top-level ``state`` item may be (handled by type):
- ``nn.Module`` (plain or DDP-wrapped): replicated; saved once, loaded by every rank.
- :class:`OptimizerState` (model, torch optimizer): replicated, keyed by parameter names.
- :class:`RowShardedState`: an object whose ``state_dict()`` tensors are this rank's rows
  ``[start, stop)`` of global tensors (the head's W slice, its row-sparse optimizer state). Saved as
  DCP ShardedTensors with explicit row offsets, so loading at another world size reshards, uneven
  slices included. (DTensor ``Shard(0)`` cannot express "ranks differ by at most one row": it uses
  torch.chunk sizes, e.g. 3/3/3/1 for 10 rows on 4 ranks instead of 3/3/2/2.)
- :class:`PerRank`: a value private to each rank; loads as None on ranks the checkpoint did not have.
- anything with ``state_dict()``/``load_state_dict()`` (LR scheduler, GradScaler): replicated.
- other values (e.g. the data-position dict): replicated; :func:`load_checkpoint` returns them.
Replicated values must be identical on every rank (DCP keeps one copy).
Per-rank RNG states (torch, numpy, python, and the accelerator's) are saved and restored automatically.
"""
from __future__ import annotations

import json
import logging
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, init_from_local_shards
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from largefr.distributed import DistContext

log = logging.getLogger("largefr.train")

_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_RNG_KEY = "_rng"
_RESERVED_FILES = {"backbone.pt", "meta.json", ".metadata"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class RowShard:
    """Rows ``[start, start + len(tensor))`` of a global tensor with ``global_rows`` rows."""

    tensor: torch.Tensor
    start: int
    global_rows: int

    def __post_init__(self) -> None:
        rows = self.tensor.shape[0] if self.tensor.dim() else 0
        if rows < 1 or self.start < 0 or self.start + rows > self.global_rows:
            raise ValueError(
                f"row shard [{self.start}, {self.start + rows}) of shape {list(self.tensor.shape)} does not fit "
                f"in {self.global_rows} global rows (expected a non-empty slice inside [0, global_rows))"
            )


class RowShardedState:
    """Adapter for a model-parallel object (head, row-sparse optimizer) owning rows ``class_range``.

    Every tensor of ``obj.state_dict()`` (nested dicts allowed) whose first dimension equals the number
    of local rows is a row shard of a global tensor; all other values are replicated.
    """

    def __init__(self, obj: Any, class_range: tuple[int, int], num_classes: int) -> None:
        start, stop = class_range
        if not 0 <= start < stop <= num_classes:
            raise ValueError(f"class_range {class_range} must be a non-empty range inside [0, {num_classes})")
        self.obj, self.start, self.stop, self.num_classes = obj, start, stop, num_classes

    def state_dict(self) -> dict[str, Any]:
        return _map_leaves(self.obj.state_dict(), self._wrap)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.obj.load_state_dict(_map_leaves(state, lambda v: v.tensor if isinstance(v, RowShard) else v))

    def _wrap(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == self.stop - self.start:
            return RowShard(value, self.start, self.num_classes)
        return value


@dataclass
class OptimizerState:
    """A torch optimizer with its model, saved by parameter name (DDP prefixes removed)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state)


@dataclass
class PerRank:
    """A value private to one rank (e.g. its data-loader position)."""

    value: Any


def step_dir_name(step: int) -> str:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step_{step:08d}"


def completed_checkpoints(ckpt_root: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoints under ``ckpt_root``, oldest first; ``*.tmp`` are ignored."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / ".metadata").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    found = completed_checkpoints(ckpt_root)
    return found[-1][1] if found else None


def save_checkpoint(
    ckpt_root: str | Path,
    step: int,
    state: dict[str, Any],
    ctx: DistContext,
    keep_last: int = 2,
    extra_files: dict[str, bytes] | None = None,
    meta: dict[str, Any] | None = None,
    write_more: Callable[[Path], None] | None = None,
) -> Path:
    """Save ``state`` (see module doc) as ``<ckpt_root>/step_NNNNNNNN``; collective over ``ctx.group``.

    ``write_more(dir)`` (e.g. a DeepSpeed engine's own save) runs on every rank after the DCP save,
    into the unpublished directory, so the rename publishes it with the rest.

    ``meta`` (e.g. :func:`backbone_meta`) goes into ``meta.json`` with the step and world size; when
    ``state["backbone"]`` is a module its plain state_dict is also written as ``backbone.pt``.
    Afterwards this one and the ``keep_last - 1`` before it are kept; checkpoints of later steps (an
    abandoned continuation of a run resumed from an earlier step) are removed, with a warning.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if _RNG_KEY in state:
        raise ValueError(f"state key {_RNG_KEY!r} is reserved for the per-rank RNG states")
    extra_files = dict(extra_files or {})
    for name, data in extra_files.items():
        if not _SAFE_NAME.match(name) or name in _RESERVED_FILES or not isinstance(data, bytes):
            raise ValueError(f"extra file {name!r} must be a plain file name (not {sorted(_RESERVED_FILES)}) with bytes")
    root = Path(ckpt_root)
    final = root / step_dir_name(step)
    tmp = final.with_name(final.name + ".tmp")
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a crash at this step
        tmp.mkdir(parents=True)
    dist.barrier(group=ctx.group)

    to_save = _collect({**state, _RNG_KEY: PerRank(_rng_state(ctx))}, ctx)
    with _quiet_sharded_tensor():
        dcp.save(to_save, checkpoint_id=str(tmp), process_group=ctx.group)
    if write_more is not None:
        write_more(tmp)
        dist.barrier(group=ctx.group)

    def publish() -> None:
        backbone = to_save.get("backbone") if isinstance(state.get("backbone"), nn.Module) else None
        if backbone is not None:
            torch.save({k: v.detach().cpu() for k, v in backbone.items()}, tmp / "backbone.pt")
        info = {**(meta or {}), "step": step, "world_size": ctx.world_size, "format": "largefr-dcp-v1"}
        (tmp / "meta.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        for name, data in extra_files.items():
            (tmp / name).write_bytes(data)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _prune(root, step, keep_last)

    _on_main_then_share_errors(publish, ctx)
    return final


def _prune(root: Path, step: int, keep_last: int) -> None:
    """After writing ``step``: keep it and the newest ``keep_last - 1`` earlier checkpoints.

    Checkpoints past ``step`` are removed: the run was resumed from an earlier step (or with another
    step size), so they belong to an abandoned continuation that auto-resume must not pick.
    """
    checkpoints = completed_checkpoints(root)
    abandoned = [path for s, path in checkpoints if s > step]
    if abandoned:
        log.warning("removing %d checkpoint(s) past step %d, the step just written (a run continued from an "
                    "earlier point; auto-resume must not pick them): %s", len(abandoned), step,
                    ", ".join(path.name for path in abandoned))
    earlier = [path for s, path in checkpoints if s < step]
    for old in abandoned + earlier[: max(0, len(earlier) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def load_checkpoint(path: str | Path, state: dict[str, Any], ctx: DistContext, restore_rng: bool = True) -> dict[str, Any]:
    """Load a checkpoint saved at any world size into ``state``; collective over ``ctx.group``.

    Modules, optimizers, row-sharded and stateful items are loaded in place (row shards into this
    rank's current ``class_range``). Returns ``state``'s keys mapped to the loaded values: the object
    itself for in-place items, the loaded value for plain items, the value or None for :class:`PerRank`.
    """
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no .metadata); use latest_checkpoint()")
    saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    top_level = sorted({fqn.split(".")[0] for fqn in saved})
    wanted = {k: v for k, v in state.items() if not isinstance(v, PerRank) or _has_prefix(saved, _rank_key(k, ctx))}
    missing = [k for k in wanted if k not in top_level]
    if missing:
        raise KeyError(f"checkpoint {path} has no entries {missing}; it holds {top_level}")
    if restore_rng and _has_prefix(saved, _rank_key(_RNG_KEY, ctx)):
        wanted[_RNG_KEY] = PerRank(_rng_state(ctx))
    dest = _collect(wanted, ctx)
    with _quiet_sharded_tensor():
        dcp.load(dest, checkpoint_id=str(path), process_group=ctx.group)
    result: dict[str, Any] = {}
    for key, item in state.items():
        result[key] = _restore(item, dest[key], ctx) if key in wanted else None
    if _RNG_KEY in wanted:
        _set_rng_state(_unwrap_rank(dest[_RNG_KEY], ctx), ctx)
    return result


def read_meta(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "meta.json").read_text())


def backbone_meta(name: str, embedding_size: int, image_size: int = 112, **backbone_kwargs: Any) -> dict[str, Any]:
    """``meta.json`` fields that let an eval/export tool rebuild the backbone with build_backbone."""
    return {"backbone": name, "embedding_size": embedding_size, "image_size": image_size,
            "backbone_kwargs": backbone_kwargs}


def load_exported_backbone(path: str | Path) -> nn.Module:
    """Rebuild the backbone of a checkpoint directory from ``meta.json`` + ``backbone.pt`` (eval mode, CPU)."""
    from largefr.models import build_backbone

    meta = read_meta(path)
    model = build_backbone(meta["backbone"], meta["embedding_size"], **meta.get("backbone_kwargs", {}))
    model.load_state_dict(torch.load(Path(path) / "backbone.pt", map_location="cpu", weights_only=True))
    return model.eval()


# --------------------------------------------------------------------------------------------- helpers


def _collect(state: dict[str, Any], ctx: DistContext) -> dict[str, Any]:
    """The DCP state dict for ``state``: state_dicts, ShardedTensors for row shards, per-rank keys."""
    out: dict[str, Any] = {}
    for key, item in state.items():
        if not re.match(r"^[A-Za-z0-9_]+$", key):
            raise ValueError(f"state key {key!r} must be letters, digits or '_' (DCP uses '.' as separator)")
        if isinstance(item, nn.Module):
            out[key] = get_model_state_dict(item)
        elif isinstance(item, PerRank):
            out[key] = {f"rank{ctx.rank}": item.value}
        elif hasattr(item, "state_dict") and hasattr(item, "load_state_dict"):
            out[key] = item.state_dict()
        else:
            out[key] = item
        out[key] = _map_leaves(out[key], lambda v: _to_sharded(v, ctx) if isinstance(v, RowShard) else v)
    return out


def _restore(item: Any, loaded: Any, ctx: DistContext) -> Any:
    loaded = _map_leaves(loaded, lambda v: _local(v) if isinstance(v, ShardedTensor) else v)
    if isinstance(item, nn.Module):
        set_model_state_dict(item, loaded)
        return item
    if isinstance(item, PerRank):
        return _unwrap_rank(loaded, ctx)
    if hasattr(item, "state_dict") and hasattr(item, "load_state_dict"):
        item.load_state_dict(loaded)
        return item
    return loaded


def _to_sharded(shard: RowShard, ctx: DistContext) -> ShardedTensor:
    sizes = list(shard.tensor.shape)
    placement = f"rank:{dist.get_rank()}/{shard.tensor.device}"  # ShardedTensor wants the global rank
    md = ShardMetadata(shard_offsets=[shard.start] + [0] * (len(sizes) - 1), shard_sizes=sizes, placement=placement)
    global_size = [shard.global_rows, *sizes[1:]]
    with _quiet_sharded_tensor():
        return init_from_local_shards([Shard(shard.tensor, md)], global_size, process_group=ctx.group)


def _local(tensor: ShardedTensor) -> torch.Tensor:
    with _quiet_sharded_tensor():
        return tensor.local_shards()[0].tensor


def _map_leaves(value: Any, fn: Any) -> Any:
    if isinstance(value, dict):
        return {k: _map_leaves(v, fn) for k, v in value.items()}
    return fn(value)


def _rank_key(key: str, ctx: DistContext) -> str:
    return f"{key}.rank{ctx.rank}"


def _has_prefix(saved: set[str], prefix: str) -> bool:
    return any(fqn == prefix or fqn.startswith(prefix + ".") for fqn in saved)


def _unwrap_rank(loaded: dict[str, Any], ctx: DistContext) -> Any:
    return loaded[f"rank{ctx.rank}"]


def _rng_state(ctx: DistContext) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if ctx.device.type != "cpu":
        state["device"] = torch.get_device_module(ctx.device.type).get_rng_state(ctx.device)
    return state


def _set_rng_state(state: dict[str, Any], ctx: DistContext) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "device" in state and ctx.device.type != "cpu":
        torch.get_device_module(ctx.device.type).set_rng_state(state["device"], ctx.device)


def _on_main_then_share_errors(fn: Callable[[], None], ctx: DistContext) -> None:
    """Run ``fn`` on rank 0; every rank raises if it failed (no rank is left waiting)."""
    error: Exception | None = None
    message: list[str | None] = [None]
    if ctx.is_main:
        try:
            fn()
        except Exception as exc:  # re-raised below on rank 0, reported to the other ranks
            error, message[0] = exc, f"{type(exc).__name__}: {exc}"
    dist.broadcast_object_list(message, group=ctx.group, group_src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise RuntimeError(f"checkpoint publish failed on rank 0: {message[0]}")


class _quiet_sharded_tensor(warnings.catch_warnings):
    """ShardedTensor warns that it is being deprecated in favour of DTensor (see module doc for why)."""

    def __enter__(self) -> Any:
        result = super().__enter__()
        warnings.filterwarnings("ignore", message=".*DTensor instead.*", category=FutureWarning)
        return result
