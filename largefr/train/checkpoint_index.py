"""Finding checkpoints in a checkpoint root: which are complete, in which order, which is the newest.

A checkpoint is ``<root>/step_NNNNNNNN/`` holding DCP's ``.metadata`` (written last) and ``meta.json``;
:func:`checkpoint_problem` also checks every data file ``.metadata`` refers to, so a directory that lost a
shard after it was published is not resumed.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch.distributed.checkpoint as dcp

log = logging.getLogger("largefr.train")

_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def step_dir_name(step: int) -> str:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step_{step:08d}"


def completed_checkpoints(ckpt_root: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoints under ``ckpt_root``, oldest first; ``*.tmp`` are ignored.

    "Oldest" is by ``samples_consumed`` (in ``meta.json``) when every checkpoint records it: step numbers
    of runs with different step sizes (another world or batch size) do not compare; else by step."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / ".metadata").is_file():
            found.append((int(match.group(1)), child))
    keys = {path: _samples_consumed(path) for _, path in found}
    if found and all(key is not None for key in keys.values()):
        return sorted(found, key=lambda item: (keys[item[1]], item[0]))
    return sorted(found)


def _samples_consumed(path: Path) -> int | None:
    try:
        value = json.loads((path / "meta.json").read_text()).get("samples_consumed")
    except (OSError, ValueError):
        return None
    return int(value) if isinstance(value, int) else None


def checkpoint_problem(path: str | Path) -> str:
    """'' when ``path`` is a loadable checkpoint, else what is wrong: no ``.metadata`` or ``meta.json``,
    or a data file that ``.metadata`` refers to missing or shorter than the bytes it should hold (a shard
    lost after the save, e.g. a partial copy)."""
    path = Path(path)
    for name in (".metadata", "meta.json"):
        if not (path / name).is_file():
            return f"no {name}"
    try:
        storage = dcp.FileSystemReader(str(path)).read_metadata().storage_data
    except Exception as exc:  # unreadable .metadata: any pickle/IO error means the same here
        return f"unreadable .metadata ({type(exc).__name__}: {exc})"
    needed: dict[str, int] = {}
    for info in (storage or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), int(info.offset) + int(info.length))
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            return f"shard file {name} is missing"
        if file.stat().st_size < size:
            return f"shard file {name} has {file.stat().st_size} bytes, .metadata needs {size}"
    return ""


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The newest loadable checkpoint directory, or None; newer incomplete ones are skipped with a warning."""
    for step, path in reversed(completed_checkpoints(ckpt_root)):
        problem = checkpoint_problem(path)
        if not problem:
            return path
        log.warning("checkpoint %s is incomplete (%s); trying the previous one", path, problem)
    return None
