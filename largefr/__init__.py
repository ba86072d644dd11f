"""largefr: face-recognition training at millions of identities.

Public API: ``PartialFC`` (the model-parallel margin-softmax head) and ``margins`` (the margin family).
"""
from largefr.heads import PartialFC, margins

__version__ = "0.1.0"
__all__ = ["PartialFC", "__version__", "margins"]
