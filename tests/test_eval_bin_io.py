"""Safe loading of insightface verification .bin files."""
from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from largefr.eval.bin_io import BinFormatError, load_bin, loads_bin, write_bin

IMAGES = [b"\xff\xd8jpeg-%d" % i for i in range(6)]
ISSAME = [True, False, True]


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what a malicious .bin would carry
        return (os.system, (f"touch {self.marker}",))


class _EvilExec:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_roundtrip_writer_and_loader(tmp_path: Path) -> None:
    path = tmp_path / "lfw.bin"
    write_bin(path, IMAGES, ISSAME)
    vb = load_bin(path)
    assert vb.name == "lfw" and vb.images == IMAGES and vb.num_pairs == 3
    assert vb.issame.dtype == np.bool_ and vb.issame.tolist() == ISSAME


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("issame", [ISSAME, np.array(ISSAME), [np.bool_(v) for v in ISSAME]])
def test_python3_pickles_with_numpy_bool_issame_load(tmp_path: Path, protocol: int, issame) -> None:
    path = tmp_path / "x.bin"
    path.write_bytes(pickle.dumps((IMAGES, issame), protocol=protocol))
    vb = load_bin(path)
    assert vb.images == IMAGES and vb.issame.tolist() == ISSAME


def test_python2_pickle_loads_as_bytes() -> None:
    # as written by Python 2: str images are SHORT_BINSTRING ('U'), bools NEWTRUE/NEWFALSE, no globals
    data = b"\x80\x02(]q\x00(U\x02a\xffU\x01be]q\x01\x88at."
    vb = loads_bin(data)
    assert vb.images == [b"a\xff", b"b"] and vb.issame.tolist() == [True]


@pytest.mark.parametrize("protocol", [0, 2, 5])
@pytest.mark.parametrize("payload", [_Evil, _EvilExec])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path: Path, protocol: int, payload) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps((IMAGES[:2], [payload(marker)]), protocol=protocol))
    refused = r"evil\.bin.*refusing global (posix|os|nt|builtins|__builtin__)\.(system|exec)"
    with pytest.raises(BinFormatError, match=refused):
        load_bin(path)
    assert not marker.exists()
    # the same bytes really are harmful to a plain unpickler, so the test above can fail
    pickle.loads(path.read_bytes())
    assert marker.exists()


def test_numpy_admission_is_limited_to_bool(tmp_path: Path) -> None:
    obj = np.array([print, sys.exit], dtype=object)
    with pytest.raises(BinFormatError, match=r"numpy.dtype is admitted only for bool"):
        loads_bin(pickle.dumps((IMAGES[:2], obj), protocol=2))
    with pytest.raises(BinFormatError, match=r"only for bool"):
        loads_bin(pickle.dumps((IMAGES[:2], np.array([1.0])), protocol=5))
    with pytest.raises(BinFormatError, match=r"only as \(str, 'latin1'\)"):
        loads_bin(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x04\x00\x00\x00zlib\x86R.")


def test_state_cannot_be_set_on_admitted_globals() -> None:
    # GLOBAL numpy.dtype, then BUILD with a slot-state dict that would overwrite the wrapper's attributes
    data = b"\x80\x02cnumpy\ndtype\nN}X\x03\x00\x00\x00_fnNs\x86b."
    with pytest.raises(BinFormatError, match=r"refusing to set state on <admitted _bool_dtype>"):
        loads_bin(data)
    assert loads_bin(pickle.dumps((IMAGES[:2], np.array([True])), protocol=2)).num_pairs == 1


@pytest.mark.parametrize(
    "obj,match",
    [
        ({"a": 1}, r"expected a pair \(images, issame\), got dict"),
        ((IMAGES, ISSAME, 1), r"expected a pair"),
        ((IMAGES[:5], ISSAME), r"expected 2 \* len\(issame\) = 6 images .*got 5"),
        (([], []), r"expected 2 \* len\(issame\) = 0 images \(and >= 1 pair\)"),
        ((IMAGES[:2], [1]), r"issame\[0\]=1 is not a bool"),
        (([b"a", "b"], [True]), r"image 1 is str, expected encoded image bytes"),
        ((IMAGES[:2], np.array([[True]])), r"issame array must be 1-D bool"),
    ],
)
def test_wrong_structure_is_a_clear_error(tmp_path: Path, obj, match: str) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(BinFormatError, match=r"bad\.bin.*" + match):
        load_bin(path)


def test_garbage_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "junk.bin"
    path.write_bytes(b"\x00\x01not a pickle")
    with pytest.raises(BinFormatError, match=r"junk\.bin: not a readable verification pickle"):
        load_bin(path)
    with pytest.raises(FileNotFoundError, match=r"nope\.bin"):
        load_bin(tmp_path / "nope.bin")
    with pytest.raises(BinFormatError, match=r"expected 2 \* len\(issame\)"):
        write_bin(tmp_path / "w.bin", IMAGES[:3], ISSAME)
