"""Sharded, atomic, reshardable training checkpoints with torch.distributed.checkpoint (DCP).

Layout of ``<ckpt_root>/step_NNNNNNNN/``: DCP files (``.metadata`` is written last by DCP, so a
directory holding it is complete), plus on rank 0 ``meta.json``, the exported backbone
(``backbone.pt``, written with :mod:`largefr.backbone_file` when ``backbone_meta`` is given) and any ``extra_files`` (e.g. ``config.yaml``). Each save goes to ``step_NNNNNNNN.tmp/``
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

from largefr.backbone_file import CheckpointMeta, write_backbone, write_meta_json
from largefr.distributed import DistContext, barrier, broadcast_object, global_rank
from largefr.train.checkpoint_index import (  # re-exported: the checkpoint API lives here
    checkpoint_problem,
    completed_checkpoints,
    latest_checkpoint,
    step_dir_name,
)

__all__ = [
    "OptimizerState", "PerRank", "RowShard", "RowShardedState", "checkpoint_problem", "completed_checkpoints",
    "latest_checkpoint", "load_checkpoint", "load_every_rank", "save_checkpoint", "step_dir_name",
]

log = logging.getLogger("largefr.train")

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


def save_checkpoint(
    ckpt_root: str | Path,
    step: int,
    state: dict[str, Any],
    ctx: DistContext,
    keep_last: int = 2,
    extra_files: dict[str, bytes] | None = None,
    meta: dict[str, Any] | None = None,
    backbone_meta: CheckpointMeta | None = None,
    write_more: Callable[[Path], None] | None = None,
) -> Path:
    """Save ``state`` (see module doc) as ``<ckpt_root>/step_NNNNNNNN``; collective over ``ctx.group``.

    ``meta`` goes into ``meta.json`` with the step and world size. With ``backbone_meta``,
    ``state["backbone"]`` (a module) is also exported with :mod:`largefr.backbone_file` (``backbone.pt``
    and the backbone fields of ``meta.json``), so ``largefr eval`` reads the checkpoint directory.

    ``write_more(dir)`` (e.g. a DeepSpeed engine's own save) runs on every rank after the DCP save,
    into the unpublished directory, so the rename publishes it with the rest.
    Afterwards this one and the ``keep_last - 1`` before it are kept; checkpoints of later steps (an
    abandoned continuation of a run resumed from an earlier step) are removed, with a warning.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    if _RNG_KEY in state:
        raise ValueError(f"state key {_RNG_KEY!r} is reserved for the per-rank RNG states")
    if backbone_meta is not None and not isinstance(state.get("backbone"), nn.Module):
        raise ValueError("backbone_meta is given but state['backbone'] is not a module to export")
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
    barrier(ctx.group)

    to_save = _collect({**state, _RNG_KEY: PerRank(_rng_state(ctx))}, ctx)
    with _quiet_sharded_tensor():
        dcp.save(to_save, checkpoint_id=str(tmp), process_group=ctx.group)
    if write_more is not None:
        write_more(tmp)
        barrier(ctx.group)

    def publish() -> None:
        info = {**(meta or {}), "step": step, "world_size": ctx.world_size, "format": "largefr-dcp-v1"}
        if backbone_meta is not None:
            write_backbone(tmp, to_save["backbone"], backbone_meta, extra_fields=info)
        else:
            write_meta_json(tmp, info)
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
    checkpoints = completed_checkpoints(root)  # in progress order (samples consumed, else step)
    written = [i for i, (s, _) in enumerate(checkpoints) if s == step]
    here = written[-1] if written else len(checkpoints)
    abandoned = [path for _, path in checkpoints[here + 1:]]
    if abandoned:
        log.warning("removing %d checkpoint(s) past step %d, the step just written (a run continued from an "
                    "earlier point; auto-resume must not pick them): %s", len(abandoned), step,
                    ", ".join(path.name for path in abandoned))
    earlier = [path for _, path in checkpoints[:here]]
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
    saved_metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    saved = set(saved_metadata)
    top_level = sorted({fqn.split(".")[0] for fqn in saved})
    wanted = {k: v for k, v in state.items() if not isinstance(v, PerRank) or _has_prefix(saved, _rank_key(k, ctx))}
    missing = [k for k in wanted if k not in top_level]
    if missing:
        raise KeyError(f"checkpoint {path} has no entries {missing}; it holds {top_level}")
    if restore_rng and _has_prefix(saved, _rank_key(_RNG_KEY, ctx)):
        rng = _rng_state(ctx)
        if not _has_prefix(saved, _rank_key(_RNG_KEY, ctx) + ".device"):
            rng.pop("device", None)  # written on the CPU, resumed on an accelerator: no device RNG state saved
        wanted[_RNG_KEY] = PerRank(rng)
    dest = _collect(wanted, ctx)
    _report_dtype_changes(saved_metadata, dest, path, ctx)
    with _quiet_sharded_tensor():
        dcp.load(dest, checkpoint_id=str(path), process_group=ctx.group)
    result: dict[str, Any] = {}
    for key, item in state.items():
        result[key] = _restore(item, dest[key], ctx) if key in wanted else None
    if _RNG_KEY in wanted:
        _set_rng_state(_unwrap_rank(dest[_RNG_KEY], ctx), ctx)
    return result


def load_every_rank(path: str | Path, key: str, ctx: DistContext) -> list[dict[str, Any]]:
    """The flat-dict :class:`PerRank` item ``key`` of every rank that saved ``path``, in rank order, on
    every rank of ``ctx`` (any world size); collective over ``ctx.group``."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    template: dict[str, dict[str, Any]] = {}
    for fqn in saved:
        head, _, rest = fqn.partition(".")
        rank_key, _, leaf = rest.partition(".")
        if head == key and rank_key.startswith("rank") and leaf and "." not in leaf:
            template.setdefault(rank_key, {})[leaf] = None
    ranks = sorted(int(name[4:]) for name in template)
    if ranks != list(range(len(ranks))) or not ranks:
        raise KeyError(f"checkpoint {path} holds {key!r} for ranks {ranks}, expected ranks 0..N-1")
    dest = {key: template}
    dcp.load(dest, checkpoint_id=str(path), process_group=ctx.group)
    return [dict(dest[key][f"rank{r}"]) for r in ranks]


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


def _report_dtype_changes(saved: dict[str, Any], dest: dict[str, Any], path: Path, ctx: DistContext) -> None:
    """Say which tensors load into another dtype (e.g. an fp32 W into a bf16 head: rounded to nearest)."""
    changes = []
    for fqn, value in _flatten(dest):
        meta = saved.get(fqn)
        properties = getattr(meta, "properties", None)
        if properties is None or not isinstance(value, (torch.Tensor, ShardedTensor)):
            continue
        have = value.metadata().tensor_properties.dtype if isinstance(value, ShardedTensor) else value.dtype
        if properties.dtype != have:
            how = "rounded to nearest" if torch.finfo(have).bits < torch.finfo(properties.dtype).bits else "exactly"
            changes.append(f"{fqn}: {properties.dtype} -> {have} ({how})")
    if changes and ctx.rank == 0:
        log.warning("checkpoint %s: converting on load: %s", path, "; ".join(changes))


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _flatten(v, f"{prefix}{k}.")]
    return [(prefix[:-1], value)]


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
    placement = f"rank:{global_rank(ctx.group)}/{shard.tensor.device}"  # ShardedTensor wants the global rank
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
    message: str | None = None
    if ctx.is_main:
        try:
            fn()
        except Exception as exc:  # re-raised below on rank 0, reported to the other ranks
            error, message = exc, f"{type(exc).__name__}: {exc}"
    message = broadcast_object(message, ctx.group, src=0)
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"checkpoint publish failed on rank 0: {message}")


class _quiet_sharded_tensor(warnings.catch_warnings):
    """ShardedTensor warns that it is being deprecated in favour of DTensor (see module doc for why)."""

    def __enter__(self) -> Any:
        result = super().__enter__()
        warnings.filterwarnings("ignore", message=".*DTensor instead.*", category=FutureWarning)
        return result
