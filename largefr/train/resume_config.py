"""What a resume does with a config that differs from the checkpoint's: honour it, or refuse it.

Refused (:data:`FIXED_ON_RESUME`, a :class:`ConfigError` naming the field and both values): the fields
that shape the saved state or the meaning of the saved position: the class count and embedding size (W's
shape), the margin (its state and the head's meaning), the backbone and its arguments, the image size,
the dataset size and seed (the epoch order the position refers to), the optimizer kinds (their state),
switching momentum on or off (its buffers), and the precision (the loss scaler's state).

Honoured: every optimizer hyperparameter is taken from the config, not from the checkpoint's restored
param groups. A new ``optim.*.lr`` becomes the group's ``initial_lr`` (the schedule's base), so the
schedule continues at the same step with the new base: ``lr = new_base * schedule(step)``. Schedule
fields, epochs, batch size, grad_accum, world size (the step is re-derived), sample rate, dropout,
logging, checkpoint and evaluation settings take effect as configured.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from largefr.config import Config, ConfigError, OptimizerConfig


FIXED_ON_RESUME = (
    "head.num_classes", "head.embedding_size", "head.margin",
    "model.name", "model.kwargs", "data.image_size", "data.num_images", "train.seed",
    "optim.backbone.name", "optim.head.name", "train.precision",
)
# per optimizer kind: config field -> param-group key
_GROUP_KEYS = {"sgd": ("lr", "momentum", "weight_decay"), "adamw": ("lr", "betas", "eps", "weight_decay")}


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def saved_config(path: Path) -> dict[str, Any] | None:
    """The resolved config saved with a checkpoint, or None when it has none."""
    config = Path(path) / "config.yaml"
    return (yaml.safe_load(config.read_text()) or {}) if config.is_file() else None


def refuse_unhonourable(saved: dict[str, Any], cfg: Config, path: Path) -> None:
    """ConfigError naming the first field of :data:`FIXED_ON_RESUME` that differs from the checkpoint."""
    now = cfg.to_dict()
    for name in FIXED_ON_RESUME:
        before, after = _lookup(saved, name), _lookup(now, name)
        if before is not None and _normal(before) != _normal(after):
            raise ConfigError(name, f"is {after!r}, but checkpoint {path} was trained with {before!r}; a resume "
                                    "cannot change it (use the checkpoint's value, or --resume none and another "
                                    "output_dir for a new run)")
    for part in ("backbone", "head"):
        ocfg: OptimizerConfig = getattr(cfg.optim, part)
        before, after = _lookup(saved, f"optim.{part}.momentum"), ocfg.momentum
        if ocfg.name == "sgd" and before is not None and (before == 0) != (after == 0):
            raise ConfigError(f"optim.{part}.momentum", f"is {after!r}, but checkpoint {path} has {before!r}: "
                                                       "momentum cannot be switched on or off on resume")


def _normal(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


def apply_optimizer_config(optimizer: torch.optim.Optimizer, ocfg: OptimizerConfig, label: str) -> list[str]:
    """Set every param group's hyperparameters from the config (the base lr as ``initial_lr``); returns
    the changes, as ``"optim.<label>.<field>: old -> new"``. The caller re-applies the schedule."""
    changes = []
    for group in optimizer.param_groups:
        for key in _GROUP_KEYS[ocfg.name]:
            target = "initial_lr" if key == "lr" else key
            value = tuple(ocfg.betas) if key == "betas" else getattr(ocfg, key)
            old = group.get(target)
            if old is not None and _normal(old) != _normal(value):
                changes.append(f"optim.{label}.{key}: {old!r} -> {value!r}")
            group[target] = value
    return changes
