"""Backbones: pure nn.Modules created by name (nothing distributed inside)."""
from largefr.models import iresnet as _iresnet  # noqa: F401  (registers iresnet18..200)
from largefr.models import mobilefacenet as _mobilefacenet  # noqa: F401  (registers mobilefacenet)
from largefr.models.iresnet import IResNet
from largefr.models.mobilefacenet import MobileFaceNet
from largefr.models.registry import build_backbone, list_backbones, register_backbone

__all__ = ["IResNet", "MobileFaceNet", "build_backbone", "list_backbones", "register_backbone"]
