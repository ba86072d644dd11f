"""Process-group setup and the ONE place that chooses backend and device.

On a machine with CUDA the backend is NCCL and each rank uses ``cuda:LOCAL_RANK``; otherwise gloo on CPU.
Everything else in largefr receives a :class:`DistContext` and never names a backend or a device itself,
so the CPU tests exercise the same code that runs on GPUs.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job and which group/device it uses."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    group: dist.ProcessGroup

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside [0, world_size={self.world_size})")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def compute_device_type() -> str:
    """'cuda' when CUDA is usable (the job then computes there), else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def choose_backend_and_device(local_rank: int) -> tuple[str, torch.device]:
    """nccl + cuda:local_rank when CUDA is usable, otherwise gloo + cpu."""
    if compute_device_type() == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible"
            )
        torch.cuda.set_device(local_rank)
        return "nccl", torch.device("cuda", local_rank)
    return "gloo", torch.device("cpu")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for single-process and test rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prefer_huge_pages() -> None:
    """Back large CPU tensors with transparent huge pages (torch's THP_MEM_ALLOC_ENABLE), unless the
    user chose otherwise. Takes effect only before the process's first large allocation.

    The head gathers and scatters random 2 KB rows of a multi-GB slice every step; with 4 KB pages each
    row is a TLB miss (measured here: a 50K-row gather from a 1 GB slice, 26 ms -> 13 ms with THP).
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def init_distributed(
    rank: int,
    world_size: int,
    init_method: str,
    local_rank: int | None = None,
    timeout_s: float = 600.0,
) -> DistContext:
    """Initialise the default process group explicitly and return its context."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    prefer_huge_pages()
    local_rank = rank if local_rank is None else local_rank
    backend, device = choose_backend_and_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    elif (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        raise RuntimeError(
            f"a process group is already initialised as rank {dist.get_rank()} of {dist.get_world_size()}, "
            f"but rank {rank} of {world_size} was requested"
        )
    group = dist.group.WORLD
    assert group is not None
    return DistContext(rank, world_size, local_rank, backend, device, group)


def init_from_env(timeout_s: float = 1800.0) -> DistContext:
    """Context from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without torchrun a single-process group of size 1 is created on a free local port, so the same
    collective code path runs in every case.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank = _env_int("RANK")
        world_size = _env_int("WORLD_SIZE")
        local_rank = _env_int("LOCAL_RANK", default=rank)
        return init_distributed(rank, world_size, "env://", local_rank, timeout_s)
    return init_distributed(0, 1, f"tcp://127.0.0.1:{free_port()}", 0, timeout_s)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise RuntimeError(f"environment variable {name} is not set (expected torchrun to set it)")
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise RuntimeError(f"environment variable {name}={raw!r} is not an integer") from exc
