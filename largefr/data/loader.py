"""The loader interface shared by the DALI and the torch loader, and the registry of loader kinds.

A loader class registers its ``kind`` with :func:`register_loader`; :func:`largefr.data.loader_factory.build_loader`
picks one by name. Usage by a trainer::

    loader = build_loader(data_dir, batch_size=128, rank=ctx.rank, world_size=ctx.world_size,
                          seed=cfg.seed, device=ctx.device, kind="auto", num_threads=4)
    loader.load_state_dict(ckpt["loader"])           # optional: resume mid-epoch
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)                        # keeps the position when resuming this epoch
        for images, labels in loader:                  # [B,3,H,W] uint8, [B] int64
            ...
            ckpt["loader"] = loader.state_dict()       # per rank: (epoch, step, position, skipped)
"""
from __future__ import annotations

import abc
import logging
import operator
from dataclasses import asdict, dataclass
from typing import Any, Iterator, NamedTuple, TypeVar

import torch

from largefr.data.manifest import Manifest
from largefr.data.epoch_order import EpochPlan

log = logging.getLogger("largefr.data")


@dataclass(frozen=True)
class LoaderConfig:
    """Settings common to both loaders (see :func:`build_loader`)."""

    batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    device: torch.device = torch.device("cpu")
    num_threads: int = 2
    prefetch: int = 2
    shuffle_buffer: int = 0
    flip: bool = True

    def __post_init__(self) -> None:
        for name, low in (("batch_size", 1), ("world_size", 1), ("seed", 0), ("num_threads", 0),
                          ("prefetch", 1), ("shuffle_buffer", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside [0, world_size={self.world_size})")
        if not isinstance(self.device, torch.device):
            raise TypeError(f"device must be a torch.device, got {type(self.device).__name__} {self.device!r}")


@dataclass
class LoaderState:
    """Position of one rank: ``step`` batches of ``epoch`` consumed, which used rank positions
    ``[0, position)`` (``position - step*batch_size`` of them were corrupt and skipped)."""

    epoch: int = 0
    step: int = 0
    position: int = 0
    skipped: int = 0


class Batch(NamedTuple):
    images: torch.Tensor
    labels: torch.Tensor
    position: int
    skipped: int


class FaceLoader(abc.ABC):
    """One epoch per iteration of equal-size batches ``(images, labels)`` for this rank.

    ``images`` is uint8 [B, 3, H, W] (RGB, contiguous, mirrored where the flip applies) on ``config.device``,
    ``labels`` int64 [B] on the same device; :func:`largefr.models.input.normalize_images` turns the
    images into the backbone's float32 input on that device. ``len(loader)`` is the number of batches per
    epoch, equal on every rank. Finishing an epoch advances the state to the next epoch; ``set_epoch(e)``
    selects epoch ``e`` (from its start unless the state is already inside epoch ``e``, as after
    ``load_state_dict``). ``skipped`` counts corrupt or undecodable samples skipped so far (each one is
    also logged).
    """

    kind: str = ""

    def __init__(self, manifest: Manifest, config: LoaderConfig) -> None:
        self.manifest = manifest
        self.config = config
        self._state = LoaderState()
        manifest.check_files()
        self._plan(0)

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def skipped(self) -> int:
        return self._state.skipped

    @property
    def epoch(self) -> int:
        return self._state.epoch

    def _plan(self, epoch: int) -> EpochPlan:
        c = self.config
        return EpochPlan(tuple(self.manifest.shard_counts), c.seed, epoch, c.rank, c.world_size, c.batch_size)

    def __len__(self) -> int:
        return (self.manifest.num_samples // self.config.world_size) // self.config.batch_size

    def set_epoch(self, epoch: int) -> None:
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        if epoch != self._state.epoch:
            self._state = LoaderState(epoch=epoch, skipped=self._state.skipped)

    def state_dict(self) -> dict[str, Any]:
        c = self.config
        return {**asdict(self._state), "world_size": c.world_size, "batch_size": c.batch_size, "seed": c.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at (epoch, step). Saved with another world size or batch size, the epoch is kept and
        the step rescaled by the global samples consumed (the exact position is then unknown). A state
        saved with another seed describes another sample order and is refused."""
        epoch, step, position, skipped = _state_ints(state, ("epoch", "step", "position", "skipped"))
        c = self.config
        if "seed" in state and _state_ints(state, ("seed",))[0] != c.seed:
            raise ValueError(f"loader state was saved with seed={state['seed']!r}, this loader uses seed={c.seed}: "
                             "the sample order differs, so its position means nothing here")
        saved_world, saved_batch = _saved_sizes(state, c)
        if epoch < 0 or skipped < 0 or step < 0:
            raise ValueError(f"loader state epoch={epoch}, step={step}, skipped={skipped}: expected integers >= 0")
        resumed = step * saved_world * saved_batch // (c.world_size * c.batch_size)
        if resumed > len(self):
            raise ValueError(f"loader state step={step} (world_size={saved_world}, batch_size={saved_batch}) is "
                             f"step {resumed} here, outside [0, {len(self)}] batches per epoch")
        if position < step * saved_batch:
            raise ValueError(f"loader state position={position} is below step x batch_size = {step} x {saved_batch}: "
                             "a position counts every sample consumed, skipped ones included")
        if (saved_world, saved_batch) != (c.world_size, c.batch_size):
            position = resumed * c.batch_size
        self._state = LoaderState(epoch, resumed, position, skipped)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        state = self._state
        plan = self._plan(state.epoch)
        skipped_before = state.skipped
        if state.step < plan.steps:
            batches = self._batches(plan, state.position, state.step)
            try:
                for batch in batches:
                    state.step += 1
                    state.position = batch.position
                    state.skipped += batch.skipped
                    yield batch.images, batch.labels
                    if state.step >= plan.steps:
                        break
            finally:
                batches.close()
        if state.skipped > skipped_before:
            log.warning("rank %d epoch %d: skipped %d corrupt samples (%d in total)", self.config.rank,
                        state.epoch, state.skipped - skipped_before, state.skipped)
        self._state = LoaderState(epoch=state.epoch + 1, skipped=state.skipped)

    @abc.abstractmethod
    def _batches(self, plan: EpochPlan, position: int, step: int) -> Iterator[Batch]:
        """Yield the batches ``step, step+1, ...`` of the epoch, reading from rank position ``position``."""


LOADER_CLASSES: dict[str, type[FaceLoader]] = {}
_L = TypeVar("_L", bound=type[FaceLoader])


def register_loader(cls: _L) -> _L:
    """Class decorator: make ``cls`` the loader of kind ``cls.kind``."""
    if not cls.kind or cls.kind in LOADER_CLASSES:
        raise ValueError(f"loader kind {cls.kind!r} of {cls.__name__} must be a new, non-empty name "
                         f"(registered: {sorted(LOADER_CLASSES)})")
    LOADER_CLASSES[cls.kind] = cls
    return cls


def _state_ints(state: dict[str, Any], names: tuple[str, ...]) -> list[int]:
    """Integer fields of a loader state (``skipped`` defaults to 0); ValueError naming a bad one."""
    values = []
    for name in names:
        value = state.get(name, 0 if name == "skipped" else None)
        try:
            if isinstance(value, bool):
                raise TypeError("a bool is not a count")
            values.append(operator.index(value))
        except TypeError as exc:
            raise ValueError(f"loader state {name}={value!r} in {state!r}: expected an integer") from exc
    return values


def _saved_sizes(state: dict[str, Any], config: LoaderConfig) -> tuple[int, int]:
    """(world_size, batch_size) the state was saved with: both recorded, or neither (then this loader's)."""
    present = [name for name in ("world_size", "batch_size") if name in state]
    if not present:
        return config.world_size, config.batch_size
    if len(present) == 1:
        missing = "batch_size" if present[0] == "world_size" else "world_size"
        raise ValueError(f"loader state records {present[0]}={state[present[0]]!r} but no {missing}: "
                         "both are needed to rescale its position")
    world, batch = _state_ints(state, ("world_size", "batch_size"))
    if world < 1 or batch < 1:
        raise ValueError(f"loader state world_size={world}, batch_size={batch}: expected integers >= 1")
    return world, batch


def out_of_samples_error(rank: int, plan: EpochPlan, corrupt: int, root: object) -> RuntimeError:
    """The error of a rank whose planned positions (its block and one more pass over it) hold too few
    valid samples to fill its batches."""
    return RuntimeError(
        f"rank {rank} epoch {plan.epoch}: ran out of valid samples after {corrupt} corrupt ones in {root}: "
        f"more than {plan.block_size} samples of this rank are unreadable"
    )


