"""One job per run directory: ``<output_dir>/run.lock``, taken by rank 0 before anything is written.

The lock file is created atomically (``O_CREAT | O_EXCL``) and holds the owner's pid, host name and start
time (JSON). It is removed when the owner exits (``release``, also from ``atexit``). A lock left by a
crash is *stale* when it names this host and a pid that is no longer alive (or alive but started after
the lock was written, i.e. a reused pid); a stale lock is replaced with a warning. A lock held by a live
process, or by another host (whose pids cannot be checked from here), is a :class:`RunDirectoryLocked`
error naming the holder and the file to remove if that job is known to be dead.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("largefr.train")

LOCK_NAME = "run.lock"


class RunDirectoryLocked(RuntimeError):
    """Another live job holds the run directory."""


@dataclass(frozen=True)
class LockOwner:
    pid: int
    host: str
    started: float  # time.time() when the lock was taken

    @staticmethod
    def this_process() -> "LockOwner":
        return LockOwner(os.getpid(), socket.gethostname(), time.time())

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on host {self.host!r} since {when}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _process_start_time(pid: int) -> float | None:
    """Wall-clock start time of ``pid`` from /proc (Linux), or None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of /proc/PID/stat: start time in clock ticks after boot
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def is_stale(owner: LockOwner, host: str | None = None) -> bool:
    """True when ``owner`` is on this host and its process is gone (or its pid now names a newer process)."""
    if owner.host != (host or socket.gethostname()):
        return False
    if not _pid_alive(owner.pid):
        return True
    started = _process_start_time(owner.pid)
    return started is not None and started > owner.started + 1.0  # 1 s: /proc's tick resolution


def read_owner(path: Path) -> LockOwner | None:
    """The owner recorded in a lock file; None when it is unreadable (e.g. being written right now)."""
    try:
        raw = json.loads(path.read_text())
        return LockOwner(int(raw["pid"]), str(raw["host"]), float(raw["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RunLock:
    """The lock of one run directory; :meth:`acquire` it once, :meth:`release` it when the job ends."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.owner: LockOwner | None = None

    def acquire(self) -> LockOwner:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock removed by us may be re-taken by a racing job: try again
            owner = LockOwner.this_process()
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._clear_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(owner), f)
            self.owner = owner
            atexit.register(self.release)
            return owner
        raise RunDirectoryLocked(f"could not take the lock {self.path}: other jobs keep taking it")

    def _clear_if_stale(self) -> None:
        holder = read_owner(self.path)
        if holder is None:  # written this instant by another job, or a crash between create and write
            age = time.time() - self.path.stat().st_mtime if self.path.exists() else 0.0
            if age < 10.0:
                time.sleep(0.2)
                holder = read_owner(self.path)
            if holder is None:
                if age < 10.0:
                    raise RunDirectoryLocked(f"{self.path.parent} is being locked by another job right now "
                                             f"({self.path} is not yet readable)")
                log.warning("removing unreadable lock file %s (%.0f s old)", self.path, age)
                self.path.unlink(missing_ok=True)
                return
        if not is_stale(holder):
            raise RunDirectoryLocked(
                f"run directory {self.path.parent} is in use by another job: {holder.describe()} holds "
                f"{self.path}. Use another output_dir, or stop that job; if it is known to be dead "
                f"(e.g. on another host), remove {self.path}"
            )
        log.warning("removing the stale lock %s of %s (that process is gone)", self.path, holder.describe())
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock file if this process still owns it (idempotent)."""
        if self.owner is None:
            return
        holder = read_owner(self.path)
        if holder == self.owner:
            self.path.unlink(missing_ok=True)
        self.owner = None
        atexit.unregister(self.release)
