"""The loader interface shared by the DALI and the torch loader, and the registry of loader kinds.

A loader class registers its ``kind`` with :func:`register_loader`; :func:`largefr.data.loader_factory.build_loader`
picks one by name. Usage by a trainer::

    loader = build_loader(data_dir, batch_size=128, rank=ctx.rank, world_size=ctx.world_size,
                          seed=cfg.seed, device=ctx.device, kind="auto", num_threads=4)
    loader.load_state_dict(ckpt["loader"])           # optional: resume mid-epoch
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch)                        # keeps the position when resuming this epoch
        for images, labels, mirror in loader:          # [B,3,H,W] uint8 (HWC memory), [B] int64, [B] bool
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
from largefr.data.epoch_order import EpochPlan, unread_pool
from largefr.data.identity_balanced import IdentityBalancedPlan, read_label_table

log = logging.getLogger("largefr.data")

SAMPLERS = ("uniform", "pk")


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
    sampler: str = "uniform"  # "pk": P x K identity-balanced batches (largefr.data.identity_balanced)
    images_per_identity: int = 1  # K of the pk sampler (P = batch_size // K)

    def __post_init__(self) -> None:
        for name, low in (("batch_size", 1), ("world_size", 1), ("seed", 0), ("num_threads", 0),
                          ("prefetch", 1), ("shuffle_buffer", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside [0, world_size={self.world_size})")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        k = self.images_per_identity
        if not isinstance(k, int) or k < 1 or (self.sampler == "pk" and self.batch_size % k):
            raise ValueError(f"images_per_identity must be an integer >= 1 dividing batch_size={self.batch_size} "
                             f"(P x K batches), got {k!r}")
        if self.sampler == "pk" and self.shuffle_buffer:
            raise ValueError(f"shuffle_buffer={self.shuffle_buffer} would break the pk sampler's P x K batches; use 0")
        if not isinstance(self.device, torch.device):
            raise TypeError(f"device must be a torch.device, got {type(self.device).__name__} {self.device!r}")


@dataclass
class LoaderState:
    """Position of one rank: ``step`` batches of ``epoch`` consumed, which used rank positions
    ``[0, position)`` (``position - step*batch_size`` of them were corrupt and skipped).

    After a resume at another world or batch size mid-epoch, the rest of the epoch is ``pool`` (the
    unread sequence ranges, ``"a-b,c-d"``; see :func:`largefr.data.epoch_order.unread_pool`) dealt from
    position 0; ``step_offset`` is the step (in this loader's batches) at which that deal started, so
    ``step - step_offset`` batches of the pool are done."""

    epoch: int = 0
    step: int = 0
    position: int = 0
    skipped: int = 0
    pool: str = ""
    step_offset: int = 0


def encode_pool(pool: tuple[tuple[int, int], ...]) -> str:
    return ",".join(f"{a}-{b}" for a, b in pool)


def decode_pool(text: str) -> tuple[tuple[int, int], ...] | None:
    if not text:
        return None
    try:
        return tuple((int(a), int(b)) for a, b in (piece.split("-") for piece in text.split(",")))
    except ValueError as exc:
        raise ValueError(f"loader state pool={text!r}: expected ranges 'start-stop,start-stop,...'") from exc


class LoadedBatch(NamedTuple):
    """What a loader yields, on its device: uint8 ``images`` [B, 3, H, W] as decoded (HWC memory, i.e.
    channels-last strides), int64 ``labels`` [B], and bool ``mirror`` [B], the images to mirror left-right
    (None: none). :func:`largefr.models.input.normalize_images` applies the mirror."""

    images: torch.Tensor
    labels: torch.Tensor
    mirror: torch.Tensor | None = None


class Batch(NamedTuple):
    images: torch.Tensor
    labels: torch.Tensor
    mirror: torch.Tensor
    position: int
    skipped: int


class FaceLoader(abc.ABC):
    """One epoch per iteration of equal-size batches ``(images, labels)`` for this rank.

    Each batch is a :class:`LoadedBatch` on ``config.device``: ``images`` uint8 [B, 3, H, W] (RGB, in the
    decoders' HWC memory), ``labels`` int64 [B] and ``mirror`` bool [B] (the plan's flips; all False without
    flip); :func:`largefr.models.input.normalize_images` mirrors and turns the images into the
    backbone's float32 input on that device. ``len(loader)`` is the number of batches per
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
        self._labels = read_label_table(manifest) if config.sampler == "pk" else None
        self._pk_plan: IdentityBalancedPlan | None = None
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

    def _plan(self, epoch: int, pool: str = "", rank: int | None = None, world_size: int | None = None,
              batch_size: int | None = None) -> EpochPlan | IdentityBalancedPlan:
        c = self.config
        if self._labels is not None:  # pk: never a pool (see load_rank_states)
            return self._pk_epoch_plan(epoch)
        return EpochPlan(tuple(self.manifest.shard_counts), c.seed, epoch, c.rank if rank is None else rank,
                         world_size or c.world_size, batch_size or c.batch_size, decode_pool(pool))

    def _pk_epoch_plan(self, epoch: int) -> IdentityBalancedPlan:
        c = self.config
        if self._pk_plan is None or self._pk_plan.epoch != epoch:
            assert self._labels is not None
            self._pk_plan = IdentityBalancedPlan(tuple(self.manifest.shard_counts), self._labels, c.seed, epoch,
                                                 c.rank, c.world_size, c.batch_size, c.images_per_identity)
        return self._pk_plan

    def __len__(self) -> int:
        """Batches of a whole epoch (an epoch continued from a pool may have a few more or fewer)."""
        if self._labels is not None:  # the same for every epoch (a function of the label counts)
            return self._pk_epoch_plan(self._state.epoch).steps
        return (self.manifest.num_samples // self.config.world_size) // self.config.batch_size

    def _pool_steps(self) -> int:
        """Batches of the pool this rank's epoch continues from (0 when it is too small for one)."""
        c, pool = self.config, decode_pool(self._state.pool)
        size = sum(b - a for a, b in pool or ())
        return (size // c.world_size) // c.batch_size

    def batches_left(self) -> int:
        """Batches this rank still yields in the current epoch."""
        state = self._state
        if state.pool:
            return max(0, self._pool_steps() - (state.step - state.step_offset))
        return max(0, len(self) - state.step)

    def samples_consumed(self) -> int:
        """A measure of progress comparable across world and batch sizes: whole epochs x samples, plus
        the global samples of this epoch's consumed batches."""
        c = self.config
        return self._state.epoch * self.manifest.num_samples + self._state.step * c.world_size * c.batch_size

    def set_epoch(self, epoch: int) -> None:
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        if epoch != self._state.epoch:
            self._state = LoaderState(epoch=epoch, skipped=self._state.skipped)

    def state_dict(self) -> dict[str, Any]:
        c = self.config
        state = {**asdict(self._state), "world_size": c.world_size, "batch_size": c.batch_size, "seed": c.seed}
        if c.sampler != "uniform":
            state.update(sampler=c.sampler, images_per_identity=c.images_per_identity)
        return state

    def load_rank_states(self, states: list[dict[str, Any]]) -> None:
        """Resume from the states of *every* rank of a run (rank order), at any world or batch size: at
        the same sizes this rank's state is loaded exactly; otherwise the samples no old rank has read
        are dealt to the ranks of this loader (:func:`largefr.data.epoch_order.unread_pool`)."""
        c = self.config
        if not states:
            raise ValueError("load_rank_states needs the loader states of every rank, got none")
        sizes = {_saved_sizes(state, c) for state in states}
        if len(sizes) != 1 or next(iter(sizes))[0] != len(states):
            raise ValueError(f"loader states of {len(states)} ranks record world/batch sizes {sorted(sizes)}: "
                             "expected one state per rank of one run")
        (saved_world, saved_batch), = sizes
        if (saved_world, saved_batch) == (c.world_size, c.batch_size):
            self.load_state_dict(states[c.rank])
            return
        if self._labels is not None:  # pk: the global batches change with the sizes; continue at the rescaled step
            self.load_state_dict(states[0])
            return
        for state in states:
            self.load_state_dict(state)  # validates each (seed, counts, range), then replaced below
        fields = [tuple(_state_ints(s, ("epoch", "step", "step_offset"))) + (str(s.get("pool", "")),) for s in states]
        if len(set(fields)) != 1:
            raise ValueError(f"loader states of one checkpoint disagree on (epoch, step, step_offset, pool): {fields}")
        epoch, step, _, pool = fields[0]
        old = self._plan(epoch, pool, 0, saved_world, saved_batch)
        positions = [_state_ints(s, ("position",))[0] for s in states]
        unread = unread_pool(old, positions)
        skipped = sum(_state_ints(s, ("skipped",))[0] for s in states) if c.rank == 0 else 0  # the total, once
        pool_steps = (sum(b - a for a, b in unread) // c.world_size) // c.batch_size
        # the step the pool starts at: the epoch keeps its len(self) batches (the consumed samples rounded to
        # this setup's batches, up or down), so the configured epochs end where the LR schedule does
        resumed = max(0, len(self) - pool_steps)
        # "0-0": the epoch continues from an empty pool (every sample was read): it has no batches left
        self._state = LoaderState(epoch, resumed, 0, skipped, encode_pool(unread) if unread else "0-0", resumed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at (epoch, step). Saved with another world size or batch size, the epoch is kept and
        the step rescaled by the global samples consumed (the exact position is then unknown). A state
        saved with another seed describes another sample order and is refused."""
        epoch, step, position, skipped, offset = _state_ints(state, ("epoch", "step", "position", "skipped",
                                                                      "step_offset"))
        pool = str(state.get("pool", ""))
        decode_pool(pool)
        c = self.config
        if "seed" in state and _state_ints(state, ("seed",))[0] != c.seed:
            raise ValueError(f"loader state was saved with seed={state['seed']!r}, this loader uses seed={c.seed}: "
                             "the sample order differs, so its position means nothing here")
        saved_sampler = (state.get("sampler", "uniform"), state.get("images_per_identity", 1))
        if saved_sampler != (c.sampler, c.images_per_identity if c.sampler != "uniform" else 1):
            raise ValueError(f"loader state was saved with (sampler, images_per_identity)={saved_sampler}, this "
                             f"loader uses {(c.sampler, c.images_per_identity)}: another sample order")
        saved_world, saved_batch = _saved_sizes(state, c)
        if epoch < 0 or skipped < 0 or step < 0:
            raise ValueError(f"loader state epoch={epoch}, step={step}, skipped={skipped}: expected integers >= 0")
        resumed = step * saved_world * saved_batch // (c.world_size * c.batch_size)
        if resumed > len(self):
            raise ValueError(f"loader state step={step} (world_size={saved_world}, batch_size={saved_batch}) is "
                             f"step {resumed} here, outside [0, {len(self)}] batches per epoch")
        if not 0 <= offset <= step:
            raise ValueError(f"loader state step_offset={offset} is outside [0, step={step}]")
        if position < (step - offset) * saved_batch:
            raise ValueError(f"loader state position={position} is below (step - step_offset) x batch_size = "
                             f"({step} - {offset}) x {saved_batch}: a position counts every sample consumed, "
                             "skipped ones included")
        if (saved_world, saved_batch) != (c.world_size, c.batch_size):  # approximate: see load_rank_states
            position, pool, offset = resumed * c.batch_size, "", 0
        self._state = LoaderState(epoch, resumed, position, skipped, pool, offset)

    def __iter__(self) -> Iterator[LoadedBatch]:
        state = self._state
        skipped_before = state.skipped
        if self.batches_left() > 0:
            plan = self._plan(state.epoch, state.pool)
            batches = self._batches(plan, state.position, state.step - state.step_offset)
            try:
                for batch in batches:
                    state.step += 1
                    state.position = batch.position
                    state.skipped += batch.skipped
                    yield LoadedBatch(batch.images, batch.labels, batch.mirror)
                    if state.step - state.step_offset >= plan.steps:
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
    """Integer fields of a loader state (``skipped``, ``step_offset`` default to 0); ValueError naming a bad one."""
    values = []
    for name in names:
        value = state.get(name, 0 if name in ("skipped", "step_offset") else None)
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


