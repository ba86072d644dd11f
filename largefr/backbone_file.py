"""Load a trained backbone from a checkpoint directory.

Contract with the trainer: ``CKPT/backbone.pt`` holds the backbone's plain ``state_dict`` and
``CKPT/meta.json`` holds at least ``{"backbone": name, "embedding_size": int, "image_size": int}``
(optionally ``"backbone_kwargs": {...}`` passed on to the factory). The backbone is rebuilt with
``largefr.models.build_backbone``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


@dataclass(frozen=True)
class CheckpointMeta:
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


def read_checkpoint_meta(ckpt_dir: str | os.PathLike[str]) -> CheckpointMeta:
    path = Path(ckpt_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint meta not found: {path} (expected a checkpoint directory)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    missing = [k for k in ("backbone", "embedding_size", "image_size") if not isinstance(raw, dict) or k not in raw]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}; expected backbone, embedding_size, image_size")
    return CheckpointMeta(raw["backbone"], raw["embedding_size"], raw["image_size"], raw.get("backbone_kwargs", {}))


def _strip_wrapper_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_backbone_from_checkpoint(ckpt_dir: str | os.PathLike[str], device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild the backbone named in ``meta.json``, load ``backbone.pt`` strictly, move to ``device``, eval mode."""
    from largefr.models import build_backbone

    meta = read_checkpoint_meta(ckpt_dir)
    weights = Path(ckpt_dir) / "backbone.pt"
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
        result = model.load_state_dict(_strip_wrapper_prefix(state), strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"{weights} does not fit backbone {meta.backbone!r}: {exc}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{weights} does not fit backbone {meta.backbone!r} (embedding_size={meta.embedding_size}): "
            f"missing keys {result.missing_keys[:5]} ({len(result.missing_keys)} in all), "
            f"unexpected keys {result.unexpected_keys[:5]} ({len(result.unexpected_keys)} in all)"
        )
    return model.to(device).eval()


def save_backbone_checkpoint(
    ckpt_dir: str | os.PathLike[str], model: nn.Module, meta: CheckpointMeta
) -> Path:
    """Write ``backbone.pt`` and ``meta.json`` in the format :func:`load_backbone_from_checkpoint` reads."""
    out = Path(ckpt_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / "backbone.pt")
    payload = {"backbone": meta.backbone, "embedding_size": meta.embedding_size, "image_size": meta.image_size}
    if meta.backbone_kwargs:
        payload["backbone_kwargs"] = meta.backbone_kwargs
    (out / "meta.json").write_text(json.dumps(payload, indent=2) + "\n")
    return out
