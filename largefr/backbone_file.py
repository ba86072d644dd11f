"""The exported backbone: ``DIR/backbone.pt`` + ``DIR/meta.json``, the one reader and writer of that format.

``backbone.pt`` holds the backbone's plain ``state_dict`` (wrapper prefixes such as DDP's ``module.``
removed on write and on read); ``meta.json`` holds at least ``{"backbone": name, "embedding_size": int,
"image_size": int}`` (optionally ``"backbone_kwargs": {...}`` passed on to the factory), and may hold other
fields of the writer (a training checkpoint adds its step, world size, ...). The backbone is rebuilt with
``largefr.models.build_backbone``. Written by ``largefr train`` (every checkpoint) and ``--export-init``;
read by ``largefr eval`` / ``export`` and by resume.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
_REQUIRED = ("backbone", "embedding_size", "image_size")
WEIGHTS_FILE = "backbone.pt"
META_FILE = "meta.json"


@dataclass(frozen=True)
class CheckpointMeta:
    """What rebuilds the backbone of an exported directory (the backbone fields of ``meta.json``)."""

    backbone: str
    embedding_size: int
    image_size: int
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.backbone, str) or not self.backbone:
            raise ValueError(f"meta.json 'backbone' must be a registry name string, got {self.backbone!r}")
        for key in ("embedding_size", "image_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"meta.json {key!r} must be a positive int, got {value!r}")
        if not isinstance(self.backbone_kwargs, dict):
            raise ValueError(f"meta.json 'backbone_kwargs' must be an object, got {self.backbone_kwargs!r}")

    def json_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {key: getattr(self, key) for key in _REQUIRED}
        if self.backbone_kwargs:
            fields["backbone_kwargs"] = dict(self.backbone_kwargs)
        return fields


def read_meta_json(ckpt_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Every field of ``DIR/meta.json`` (backbone fields and whatever else its writer recorded)."""
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint meta not found: {path} (expected a checkpoint directory)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def read_checkpoint_meta(ckpt_dir: str | os.PathLike[str]) -> CheckpointMeta:
    raw = read_meta_json(ckpt_dir)
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise ValueError(f"{Path(ckpt_dir) / META_FILE}: missing keys {missing}; expected {', '.join(_REQUIRED)}")
    return CheckpointMeta(raw["backbone"], raw["embedding_size"], raw["image_size"], raw.get("backbone_kwargs", {}))


def write_meta_json(out_dir: str | os.PathLike[str], fields: Mapping[str, Any]) -> Path:
    path = Path(out_dir) / META_FILE
    path.write_text(json.dumps(dict(fields), indent=2, sort_keys=True) + "\n")
    return path


def strip_wrapper_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state_dict without a prefix every key shares from a DDP or torch.compile wrapper."""
    plain = dict(state)
    for prefix in _WRAPPER_PREFIXES:
        if plain and all(k.startswith(prefix) for k in plain):
            plain = {k[len(prefix) :]: v for k, v in plain.items()}
    return plain


def write_backbone(
    out_dir: str | os.PathLike[str],
    state: Mapping[str, torch.Tensor],
    meta: CheckpointMeta,
    extra_fields: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``state`` as ``backbone.pt`` and ``meta`` (plus ``extra_fields``) as ``meta.json`` into ``out_dir``."""
    extra = dict(extra_fields or {})
    clash = sorted(set(extra) & {*_REQUIRED, "backbone_kwargs"})
    if clash:
        raise ValueError(f"extra meta.json fields {clash} would overwrite the backbone's own fields")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in strip_wrapper_prefix(state).items()}, out / WEIGHTS_FILE)
    write_meta_json(out, {**extra, **meta.json_fields()})
    return out


def save_backbone_checkpoint(ckpt_dir: str | os.PathLike[str], model: nn.Module, meta: CheckpointMeta) -> Path:
    """Write ``model`` (a plain backbone or its DDP wrapper) in the format :func:`load_backbone_from_checkpoint` reads."""
    return write_backbone(ckpt_dir, model.state_dict(), meta)


def load_backbone_from_checkpoint(ckpt_dir: str | os.PathLike[str], device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the backbone named in ``meta.json``, load ``backbone.pt`` strictly, move to ``device``, eval mode."""
    from largefr.models import build_backbone

    meta = read_checkpoint_meta(ckpt_dir)
    weights = Path(ckpt_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"backbone weights not found: {weights}")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{weights}: expected a state_dict, got {type(state).__name__}")
    model = build_backbone(meta.backbone, meta.embedding_size, **meta.backbone_kwargs)
    model_size = getattr(model, "image_size", meta.image_size)
    if model_size != meta.image_size:
        raise ValueError(f"{ckpt_dir}: meta.json image_size={meta.image_size} but {meta.backbone} takes {model_size}")
    try:
        result = model.load_state_dict(strip_wrapper_prefix(state), strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{weights} does not fit backbone {meta.backbone!r}: {exc}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{weights} does not fit backbone {meta.backbone!r} (embedding_size={meta.embedding_size}): "
            f"missing keys {result.missing_keys[:5]} ({len(result.missing_keys)} in all), "
            f"unexpected keys {result.unexpected_keys[:5]} ({len(result.unexpected_keys)} in all)"
        )
    return model.to(device).eval()
