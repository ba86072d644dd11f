"""timm-style backbone registry: backbones are created from a string in the config."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

BackboneFactory = Callable[..., nn.Module]
_REGISTRY: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: register ``factory(embedding_size, **kwargs) -> nn.Module`` under ``name``."""

    def wrap(factory: BackboneFactory) -> BackboneFactory:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return wrap


def list_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone`, sorted."""
    return sorted(_REGISTRY)


def build_backbone(name: str, embedding_size: int = 512, **kwargs: Any) -> nn.Module:
    """Create the backbone registered as ``name`` producing ``embedding_size``-d embeddings.

    Extra keyword arguments (``grad_checkpoint``, ``dropout``, ``base_width``, ...) go to the factory.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; expected one of {list_backbones()}")
    if not isinstance(embedding_size, int) or isinstance(embedding_size, bool) or embedding_size < 1:
        raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
    try:
        return _REGISTRY[name](embedding_size=embedding_size, **kwargs)
    except TypeError as exc:
        raise TypeError(f"bad arguments for backbone {name!r}: {exc}") from exc
