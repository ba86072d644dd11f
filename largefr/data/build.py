"""Parallel, resumable writing of a dataset: a list of shard tasks -> shards, index files, manifest.

Each task becomes one shard, written by a worker process to temporary names and renamed when complete;
its statistics are then recorded in ``<out>/.largefr-build/``. A rerun with the same parameters skips the
recorded shards, so an interrupted conversion resumes where it stopped. Progress (with ETA) is a tqdm bar
over samples, fed by the workers while they write.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import queue
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

from tqdm import tqdm

from largefr.data.manifest import Manifest, ShardInfo, write_manifest
from largefr.data.shards import ShardWriter, shard_names

log = logging.getLogger("largefr.data")

STATE_DIR = ".largefr-build"
DEFAULT_SHARD_BYTES = 1 << 30
TAR_OVERHEAD = 3 * 512  # two member headers + the label's data block
_MAX_REPORTED = 50
_progress_queue: Any = None


class SampleSource(Protocol):
    """Produces the samples of one shard task in a worker process (must be picklable)."""

    def samples(self, items: Any) -> Iterator[tuple[str, bytes | None, int, str]]:
        """(key, JPEG bytes or None when unusable, class id, reason when unusable) per item."""
        ...


@dataclass(frozen=True)
class ShardTask:
    index: int
    items: Any
    num_items: int


@dataclass(frozen=True)
class ShardStats:
    index: int
    num_samples: int
    bytes: int
    max_label: int
    skipped: int
    problems: list[tuple[str, str]]


def parse_size(text: str | int) -> int:
    """Bytes from '1G', '256M', '64k', '1e9' or an int."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)i?[bB]?\s*", text)
        if not m:
            raise ValueError(f"size {text!r} is not a number with an optional k/M/G/T suffix")
        value = int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))
    if value <= 0:
        raise ValueError(f"size must be > 0 bytes, got {text!r}")
    return value


def _cost(size: int) -> int:
    return size + (-size % 512) + TAR_OVERHEAD


def shard_bytes_for(sizes: Sequence[int], shard_bytes: int, workers: int) -> int:
    """``shard_bytes``, or less when that is needed to give each of ``workers`` processes a shard."""
    return max(1, min(shard_bytes, -(-sum(_cost(s) for s in sizes) // max(1, workers))))


def plan_by_bytes(sizes: Sequence[int], shard_bytes: int) -> list[range]:
    """Consecutive groups of item indices whose estimated tar size stays near ``shard_bytes``."""
    groups, start, acc = [], 0, 0
    for i, cost in enumerate(map(_cost, sizes)):
        if acc and acc + cost > shard_bytes:
            groups.append(range(start, i))
            start, acc = i, 0
        acc += cost
    if start < len(sizes):
        groups.append(range(start, len(sizes)))
    return groups


def _init_worker(progress: Any) -> None:
    global _progress_queue
    _progress_queue = progress


def build_shard(source: SampleSource, task: ShardTask, out_dir: str) -> ShardStats:
    """Write the shard of ``task`` (runs in a worker)."""
    tar_name, idx_name = shard_names(task.index)
    out = Path(out_dir)
    writer = ShardWriter(out / tar_name, out / idx_name)
    max_label, skipped, pending = -1, 0, 0
    problems: list[tuple[str, str]] = []
    try:
        for key, data, label, reason in source.samples(task.items):
            if data is None:
                skipped += 1
                if len(problems) < _MAX_REPORTED:
                    problems.append((key, reason))
            else:
                writer.add(key, data, label)
                max_label = max(max_label, label)
            pending += 1
            if pending >= 256 and _progress_queue is not None:
                _progress_queue.put(pending)
                pending = 0
        if _progress_queue is not None and pending:
            _progress_queue.put(pending)
        if len(writer) == 0:
            writer.abort()
            return ShardStats(task.index, 0, 0, -1, skipped, problems)
        result = writer.close()
    except BaseException:
        writer.abort()
        raise
    return ShardStats(task.index, result.num_samples, result.bytes, max_label, skipped, problems)


class _Progress:
    def __init__(self, total: int, done: int, desc: str, enabled: bool) -> None:
        self.bar = tqdm(total=total, initial=done, desc=desc, unit="img", disable=not enabled, smoothing=0.1)

    def drain(self, q: Any, timeout: float) -> None:
        try:
            self.bar.update(q.get(timeout=timeout))
            while True:
                self.bar.update(q.get_nowait())
        except queue.Empty:
            pass


def run_tasks(source: SampleSource, tasks: Sequence[ShardTask], out_dir: Path, workers: int,
              desc: str, progress: bool) -> list[ShardStats]:
    """Build every task not already recorded in the state directory; return all tasks' stats."""
    state = out_dir / STATE_DIR
    done = {t.index: s for t in tasks if (s := _load_stats(state, t.index, out_dir)) is not None}
    pending = [t for t in tasks if t.index not in done]
    if done:
        log.info("%s: %d of %d shards already finished, skipping them", out_dir, len(done), len(tasks))
    bar = _Progress(sum(t.num_items for t in tasks), sum(t.num_items for t in tasks if t.index in done), desc, progress)
    ctx = mp.get_context()
    q = ctx.Queue() if workers > 1 and pending else None
    try:
        if q is None:
            _init_worker(None)
            for t in pending:
                done[t.index] = _record(state, build_shard(source, t, str(out_dir)))
                bar.bar.update(t.num_items)
        else:
            with ctx.Pool(min(workers, len(pending)), initializer=_init_worker, initargs=(q,)) as pool:
                results = [pool.apply_async(build_shard, (source, t, str(out_dir))) for t in pending]
                while results:
                    bar.drain(q, 0.2)
                    for r in [r for r in results if r.ready()]:
                        results.remove(r)
                        stats = r.get()
                        done[stats.index] = _record(state, stats)
                bar.drain(q, 0.01)
    finally:
        bar.bar.close()
    return [done[t.index] for t in tasks]


def _record(state: Path, stats: ShardStats) -> ShardStats:
    state.mkdir(exist_ok=True)
    path = state / f"shard-{stats.index:06d}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(stats)))
    os.replace(tmp, path)
    for key, reason in stats.problems:
        log.warning("skipped sample %s: %s", key, reason)
    return stats


def _load_stats(state: Path, index: int, out_dir: Path) -> ShardStats | None:
    path = state / f"shard-{index:06d}.json"
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    stats = ShardStats(**{**raw, "problems": [tuple(p) for p in raw["problems"]]})
    tar = out_dir / shard_names(index)[0]
    if stats.num_samples and (not tar.is_file() or tar.stat().st_size != stats.bytes):
        return None
    return stats


def check_params(out_dir: Path, params: dict[str, Any], plan_bytes: int) -> int:
    """Record the build parameters and return the shard size to plan with. A rerun must have the same
    parameters; it keeps the recorded plan (even with another worker count), so finished shards match."""
    state = out_dir / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    path = state / "params.json"
    text = json.dumps(params, sort_keys=True)
    if path.is_file():
        recorded = json.loads(path.read_text())
        plan_bytes = int(recorded.pop("plan_bytes", plan_bytes))
        if json.dumps(recorded, sort_keys=True) != text:
            raise ValueError(
                f"{out_dir} holds a build with other parameters ({json.dumps(recorded, sort_keys=True)}); "
                f"use an empty --out directory or the same parameters ({text})"
            )
    path.write_text(json.dumps({**params, "plan_bytes": plan_bytes}, sort_keys=True))
    return plan_bytes


def finish_manifest(out_dir: Path, stats: Sequence[ShardStats], image_size: tuple[int, int],
                    num_classes: int | None, source: str, extra: dict[str, Any]) -> Manifest:
    """Write manifest.json from the shard statistics."""
    shards = []
    for s in stats:
        if s.num_samples:
            tar, idx = shard_names(s.index)
            shards.append(ShardInfo(tar, idx, s.num_samples, s.bytes))
    if not shards:
        raise ValueError(f"no usable sample was written to {out_dir} from {source}")
    max_label = max(s.max_label for s in stats)
    classes = num_classes if num_classes is not None else max_label + 1
    if max_label >= classes:
        raise ValueError(f"class id {max_label} found but num_classes is {classes} ({source})")
    skipped = sum(s.skipped for s in stats)
    if skipped:
        log.warning("%s: %d unusable samples were skipped", source, skipped)
    manifest = Manifest(classes, sum(s.num_samples for s in shards), image_size, tuple(shards), source,
                        {**extra, "skipped": skipped}, out_dir)
    write_manifest(out_dir, manifest)
    return manifest
