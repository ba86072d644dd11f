"""Verification ``.bin`` files in the insightface format, read without running code from the file.

A ``.bin`` is a pickle of ``(images, issame)``: ``images`` a list of 2*N encoded images (JPEG/PNG bytes;
pairs are ``images[2i], images[2i+1]``) and ``issame`` a list of N bools. Files written by Python 2
(the published lfw/cfp_fp/agedb_30 sets) contain no global reference at all. Files re-saved by Python 3
with pickle protocol <= 2 encode ``bytes`` through ``_codecs.encode(str, "latin1")``, and some tools
store ``issame`` as a numpy bool array. :func:`load_bin` admits exactly those constructions, each
through a checking wrapper, and refuses every other global:

* ``_codecs.encode``                                  -> only ``(str, "latin1")``, returns bytes
* ``numpy.ndarray``                                   -> a token accepted only by ``_reconstruct``
* ``numpy[._]core.multiarray._reconstruct``           -> only ``(ndarray token, shape, dtype)``
* ``numpy.dtype``                                     -> only the bool dtype (``"b1"``)
* ``numpy[._]core.multiarray.scalar``                 -> only bool scalars, returns a Python bool
* ``numpy[._]core.numeric._frombuffer`` (protocol 5)  -> only bool dtype

Nothing else resolves, so no callable from the file other than these wrappers can be reached.
"""
from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class BinFormatError(ValueError):
    """A verification .bin that is unsafe or does not have the expected structure."""


@dataclass(frozen=True)
class VerificationBin:
    """A decoded-on-demand verification set: pairs are ``images[2i], images[2i + 1]``."""

    name: str
    images: list[bytes]
    issame: np.ndarray  # bool [num_pairs]

    @property
    def num_pairs(self) -> int:
        return int(self.issame.shape[0])


class _Sealed:
    """Base of the admitted objects: BUILD (``__setstate__``) on them is refused, and they have no ``__dict__``."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise BinFormatError(f"refusing to set state on {self!r}")


class _NdarrayToken(_Sealed):
    """Stands for ``numpy.ndarray`` inside the unpickler; it is not callable."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<numpy.ndarray token>"


class _Admitted(_Sealed):
    """A checking wrapper the unpickler hands out instead of the real global."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        object.__setattr__(self, "_fn", fn)

    def __setattr__(self, name: str, value: Any) -> None:
        raise BinFormatError(f"refusing to set attribute {name!r} on {self!r}")

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __repr__(self) -> str:
        return f"<admitted {self._fn.__name__}>"


_NDARRAY = _NdarrayToken()
_BOOL_SPECS = ("b1", "?", "bool", "|b1")


def _as_text(value: Any) -> str:
    return value.decode("ascii", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def _codecs_encode(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    if not isinstance(text, str) or _as_text(encoding).lower() not in ("latin1", "latin-1"):
        raise BinFormatError(f"_codecs.encode is admitted only as (str, 'latin1'), got encoding {encoding!r}")
    return text.encode("latin1")


def _bool_dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    if _as_text(spec) not in _BOOL_SPECS:
        raise BinFormatError(f"numpy.dtype is admitted only for bool ('b1'), got {spec!r}")
    return np.dtype("b1", False, True)  # a fresh copy, so BUILD cannot touch the global bool dtype


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not _NDARRAY:
        raise BinFormatError(f"_reconstruct is admitted only for numpy.ndarray, got {subtype!r}")
    return np.ndarray.__new__(np.ndarray, (0,), np.uint8)  # BUILD then sets shape, dtype and data


def _bool_scalar(dtype: Any, data: Any = b"") -> bool:
    if not isinstance(dtype, np.dtype) or dtype != np.bool_ or not isinstance(data, (bytes, bytearray)):
        raise BinFormatError(f"numpy scalar is admitted only for bool, got dtype {dtype!r}")
    return bool(np.frombuffer(bytes(data), dtype=np.bool_)[0])


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    if not isinstance(dtype, np.dtype) or dtype != np.bool_:
        raise BinFormatError(f"numpy _frombuffer is admitted only for bool, got dtype {dtype!r}")
    return np.frombuffer(bytes(buf), dtype=np.bool_).reshape(shape, order=_as_text(order)).copy()


_ALLOWED: dict[tuple[str, str], _Sealed] = {
    ("_codecs", "encode"): _Admitted(_codecs_encode),
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Admitted(_bool_dtype),
}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = _Admitted(_reconstruct)
    _ALLOWED[(f"{_core}.multiarray", "scalar")] = _Admitted(_bool_scalar)
    _ALLOWED[(f"{_core}.numeric", "_frombuffer")] = _Admitted(_frombuffer)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is None:
            raise BinFormatError(
                f"refusing global {module}.{name}: a verification .bin may contain only image bytes "
                "and bools (numpy bool arrays admitted)"
            )
        return allowed

    def persistent_load(self, pid: Any) -> Any:
        raise BinFormatError(f"refusing persistent id {pid!r}")


def _check_structure(obj: Any, where: str) -> tuple[list[bytes], np.ndarray]:
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise BinFormatError(f"{where}: expected a pair (images, issame), got {type(obj).__name__}")
    images, issame = obj
    if not isinstance(images, (list, tuple)):
        raise BinFormatError(f"{where}: expected images to be a list of bytes, got {type(images).__name__}")
    for i, img in enumerate(images):
        if not isinstance(img, (bytes, bytearray)):
            raise BinFormatError(f"{where}: image {i} is {type(img).__name__}, expected encoded image bytes")
    if isinstance(issame, np.ndarray):
        if issame.dtype != np.bool_ or issame.ndim != 1:
            raise BinFormatError(f"{where}: issame array must be 1-D bool, got {issame.dtype} {issame.shape}")
        flags = issame.copy()
    elif isinstance(issame, (list, tuple)):
        bad = [i for i, v in enumerate(issame) if not isinstance(v, (bool, np.bool_))]
        if bad:
            raise BinFormatError(f"{where}: issame[{bad[0]}]={issame[bad[0]]!r} is not a bool")
        flags = np.asarray(issame, dtype=np.bool_).reshape(-1)
    else:
        raise BinFormatError(f"{where}: expected issame to be a list of bool, got {type(issame).__name__}")
    if len(images) != 2 * flags.shape[0] or flags.shape[0] == 0:
        raise BinFormatError(
            f"{where}: expected 2 * len(issame) = {2 * flags.shape[0]} images (and >= 1 pair), "
            f"got {len(images)} images"
        )
    return [bytes(img) for img in images], flags


def loads_bin(data: bytes, name: str = "<bytes>") -> VerificationBin:
    """Parse the bytes of a verification .bin (see :func:`load_bin`)."""
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except BinFormatError as exc:
        raise BinFormatError(f"{name}: {exc}") from None
    except Exception as exc:  # any malformed stream: truncated, wrong opcodes, bad numpy state
        raise BinFormatError(f"{name}: not a readable verification pickle ({type(exc).__name__}: {exc})") from None
    images, issame = _check_structure(obj, name)
    return VerificationBin(name=Path(name).stem, images=images, issame=issame)


def load_bin(path: str | os.PathLike[str]) -> VerificationBin:
    """Read an insightface verification .bin safely: no code from the file runs.

    Raises :class:`BinFormatError` naming the file for any disallowed global or wrong structure.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"verification .bin not found: {p}")
    result = loads_bin(p.read_bytes(), name=str(p))
    return VerificationBin(name=p.stem, images=result.images, issame=result.issame)


def write_bin(path: str | os.PathLike[str], images: Sequence[bytes], issame: Sequence[bool] | np.ndarray) -> None:
    """Write ``(list of bytes, list of bool)`` in the format :func:`load_bin` (and insightface) reads."""
    flags = [bool(v) for v in np.asarray(issame).reshape(-1)]
    imgs = [bytes(b) for b in images]
    _check_structure((imgs, flags), str(path))
    with open(path, "wb") as f:
        pickle.dump((imgs, flags), f, protocol=4)
