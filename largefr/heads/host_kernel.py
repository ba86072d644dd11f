"""A compiled host kernel for the row-sparse SGD step (largefr/heads/csrc/row_sgd.c), loaded through ctypes.

On the CPU the optimizer's torch path takes, per block of sampled rows: a gather of the momentum rows and an
fp32 copy of them, torch's fused SGD kernel, a widened copy of the rounding noise, one rounding pass per
16-bit tensor and two scatters. The kernel does it in one pass: each momentum row is read, updated, rounded
and written back while in cache, and the W row is written straight into the slice. Its arithmetic is that of
torch's vectorised fused CPU SGD (same operation order and fused multiply-adds), and its rounding that of
largefr.heads.stochastic_round with the same noise words, so it gives the same bits as the torch path, with
two exceptions: NaNs may differ in sign and payload, and when a block's element count is not a multiple of
torch's vector width (8 floats with AVX2, 16 with AVX-512: D a multiple of 16 always is) torch updates the
last elements with scalar code whose rounding its compiler chose, so those may differ in the last bit.

The C file is compiled on first use with the system C compiler (``$CC``, else Python's configured compiler,
else ``cc``; well under a second) into ``$LARGEFR_KERNEL_DIR`` (default ``$XDG_CACHE_HOME/largefr/kernels``,
i.e. ``~/.cache/largefr/kernels``), one file per source, flags and machine, written atomically so concurrent
ranks can build it at once. Where no compiler works, or ``LARGEFR_HOST_KERNELS=0``, or torch itself runs its
generic (non-AVX2) kernels on an x86 CPU, the optimizer keeps the torch path (with one warning when a build
failed). The kernel runs on one thread (the ranks of a CPU job each have their own core here); accelerators
always use the torch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "row_sgd.c"
ENABLE_VARIABLE = "LARGEFR_HOST_KERNELS"
KERNEL_DTYPES = (torch.float32, torch.bfloat16)

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def _compiler() -> list[str]:
    """The compiler command: ``$CC`` as the user wrote it (e.g. "ccache gcc"), else Python's, else ``cc``."""
    if os.environ.get("CC"):
        command = shlex.split(os.environ["CC"])
        if not command or shutil.which(command[0]) is None:
            raise RuntimeError(f"CC={os.environ['CC']!r} is not a command found on PATH")
        return command
    configured = shlex.split(sysconfig.get_config_var("CC") or "")
    if configured and shutil.which(configured[0]):
        return configured
    if shutil.which("cc") is None:
        raise RuntimeError("no C compiler: neither CC nor cc is set up")
    return ["cc"]


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def _flags() -> list[str]:
    flags = ["-O3", "-std=c99", "-shared", "-fPIC", "-ffp-contract=off"]
    if _x86():
        flags += ["-mavx2", "-mfma"]  # what torch's own AVX2 / AVX-512 kernels assume of this CPU (checked in _load)
    return flags


def _cache_dir() -> Path:
    configured = os.environ.get("LARGEFR_KERNEL_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "largefr" / "kernels"


def _build(compiler: list[str]) -> Path:
    flags = _flags()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), " ".join(compiler).encode(),
                                     platform.machine().encode()]))
    target = _cache_dir() / f"row_sgd-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([*compiler, *flags, str(SOURCE), "-o", partial, "-lm"], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(compiler)} exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
        os.chmod(partial, 0o755)  # mkstemp made it private; other users of a shared cache must load it too
        os.replace(partial, target)  # atomic: a concurrent rank sees no file or a whole one
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _bind(library: ctypes.CDLL) -> ctypes.CDLL:
    pointer, i64, flag, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    library.row_sgd_update.restype = ctypes.c_int
    library.row_sgd_update.argtypes = [pointer, i64, i64, pointer, pointer, pointer, flag, pointer, flag, pointer,
                                       real, real, real, flag, flag]
    return library


def host_kernels() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first use; None when disabled or when it cannot be built here."""
    if os.environ.get(ENABLE_VARIABLE, "1") == "0":
        return None
    with _lock:
        if "row_sgd" not in _loaded:
            _loaded["row_sgd"] = _load()
        return _loaded["row_sgd"]


def _load() -> ctypes.CDLL | None:
    if _x86() and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None  # torch's generic kernels round a*b+c twice where the kernel fuses it; and no FMA to build for
    try:
        return _bind(ctypes.CDLL(str(_build(_compiler()))))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        warnings.warn(f"could not build the host SGD kernel ({exc}); the head's SGD uses torch's kernels on the CPU",
                      RuntimeWarning, stacklevel=3)
        return None


def kernel_applies(weight: torch.Tensor, momentum: torch.Tensor | None, compute: torch.device) -> bool:
    """True when the kernel can step these slice tensors: host storage and compute, fp32 or bf16, contiguous."""
    tensors = [weight] if momentum is None else [weight, momentum]
    return compute.type == "cpu" and all(
        t.device.type == "cpu" and t.dtype in KERNEL_DTYPES and t.is_contiguous() for t in tensors
    )


def _plain_host(t: torch.Tensor) -> bool:
    """Contiguous host memory whose bytes are its values (no lazy negation or conjugation view)."""
    return t.device.type == "cpu" and t.is_contiguous() and not t.is_neg() and not t.is_conj()


def _check_slices(weight: torch.Tensor, momentum: torch.Tensor | None, rows: torch.Tensor) -> None:
    dim = rows.shape[1] if rows.dim() == 2 else -1
    if weight.dim() != 2 or weight.shape[1] != dim or weight.dtype not in KERNEL_DTYPES or not _plain_host(weight):
        raise ValueError(f"weight {weight.dtype} {tuple(weight.shape)} on {weight.device} must be a contiguous host "
                         f"fp32 or bf16 [rows, {dim}] slice (rows {tuple(rows.shape)})")
    if momentum is not None and (momentum.shape != weight.shape or momentum.dtype not in KERNEL_DTYPES
                                 or not _plain_host(momentum)):
        raise ValueError(f"momentum {momentum.dtype} {tuple(momentum.shape)} on {momentum.device} must be contiguous "
                         f"host fp32 or bf16 of weight's shape {tuple(weight.shape)}")


def sgd_rows_(
    library: ctypes.CDLL, ids: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor,
    momentum: torch.Tensor | None, noise: torch.Tensor | None, lr: float, mu: float, wd: float, nesterov: bool,
) -> None:
    """SGD step of the slice rows ``ids`` (strictly increasing) from their fp32 ``rows`` and ``grad`` [n, D]: writes W and the
    momentum rows in their dtypes; ``noise``: n * D uint16 rounding words, needed when either is bf16."""
    _check_slices(weight, momentum, rows)
    n, dim = rows.shape
    for name, t in (("rows", rows), ("grad", grad)):
        if t.dtype != torch.float32 or t.shape != (n, dim) or not _plain_host(t):
            raise ValueError(f"{name} must be contiguous host fp32 of shape {(n, dim)}, got {t.dtype} {tuple(t.shape)}")
    if ids.dtype != torch.int64 or ids.shape != (n,) or not _plain_host(ids):
        raise ValueError(f"ids must be {n} contiguous host int64 row ids, got {ids.dtype} {tuple(ids.shape)}")
    if n and not (0 <= int(ids[0]) and int(ids[-1]) < weight.shape[0] and bool((ids[1:] > ids[:-1]).all())):
        raise ValueError(f"row ids must be strictly increasing in [0, {weight.shape[0]}), got {ids.tolist()[:8]}"
                         f"{' ...' if n > 8 else ''}")
    low_precision = weight.dtype == torch.bfloat16 or (momentum is not None and momentum.dtype == torch.bfloat16)
    if low_precision and (noise is None or noise.dtype != torch.uint16 or noise.numel() < n * dim or not _plain_host(noise)):
        raise ValueError(f"bf16 storage needs {n * dim} contiguous host uint16 noise words, got "
                         f"{None if noise is None else (noise.dtype, noise.numel(), str(noise.device))}")
    status = library.row_sgd_update(
        ids.data_ptr(), n, dim, rows.data_ptr(), grad.data_ptr(), weight.data_ptr(), int(weight.dtype == torch.bfloat16),
        None if momentum is None else momentum.data_ptr(),
        int(momentum is not None and momentum.dtype == torch.bfloat16),
        noise.data_ptr() if low_precision and noise is not None else None, float(lr), float(mu), float(wd),
        int(float(wd) != 0.0), int(nesterov),
    )
    if status != 0:
        raise RuntimeError(f"row_sgd_update returned {status}")
