"""Face data: shard format (docs/data_format.md), converters, synthetic identities, DALI and torch loaders.

Public API (imported lazily, so writer processes do not load torch or DALI):

- ``build_loader(source, *, batch_size, rank, world_size, seed, device, kind, num_threads, ...)``
- ``read_manifest(directory) -> Manifest``
- ``write_synthetic_dataset(out_dir, SynthSpec(...), workers=..., shard_bytes=...) -> Manifest``
- ``convert_rec(rec_path, out_dir, ...)`` / ``convert_folder(src_dir, out_dir, ...)``
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_loader": "largefr.data.loader_factory",
    "FaceLoader": "largefr.data.loader",
    "LoaderState": "largefr.data.loader",
    "Manifest": "largefr.data.manifest",
    "ShardInfo": "largefr.data.manifest",
    "ShardFileError": "largefr.data.manifest",
    "read_manifest": "largefr.data.manifest",
    "write_manifest": "largefr.data.manifest",
    "ShardWriter": "largefr.data.shards",
    "SynthSpec": "largefr.data.synth",
    "write_synthetic_dataset": "largefr.data.synth_dataset",
    "VERIFICATION_NAME": "largefr.data.synth_dataset",
    "convert_rec": "largefr.data.convert",
    "convert_folder": "largefr.data.convert",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'largefr.data' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
