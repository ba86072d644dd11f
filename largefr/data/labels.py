"""The one grammar of a ``.cls`` label payload, parsed one at a time (torch loader, DALI probe) or as a
padded batch (DALI pipeline output).

A label is 1 to ``MAX_LABEL_DIGITS`` ASCII digits, optionally preceded and followed by bytes of
``LABEL_WHITESPACE`` (space, tab, LF, VT, FF, CR: what ``bytes.strip()`` removes), with a value in
``[0, num_classes)``. Any other byte, NUL included, makes the sample corrupt (a counted skip): a zeroed
tail that cut a number short must not turn into another class id. A well-formed number outside
``[0, num_classes)`` is not corruption but a dataset that disagrees with its manifest: :class:`LabelOutOfRange`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

LABEL_WHITESPACE = b" \t\n\x0b\x0c\r"
MAX_LABEL_DIGITS = 18
LABEL_PAD = -1  # fills the rows of a padded batch past each payload's end (no byte has this value)


class LabelOutOfRange(ValueError):
    """A well-formed label outside the manifest's class range: the dataset is wrong, not one sample."""

    def __init__(self, value: int, num_classes: int, where: str = "") -> None:
        self.value, self.num_classes, self.where = value, num_classes, where
        place = f"sample {where}" if where else "a sample"
        super().__init__(f"dataset error: {place} has label {value}, outside [0, num_classes={num_classes}) of "
                         "the dataset manifest; fix the labels or the manifest's num_classes")

    def at(self, where: str) -> "LabelOutOfRange":
        """The same error naming the sample (``<shard path>:<member name>``)."""
        return LabelOutOfRange(self.value, self.num_classes, where)


def parse_label(raw: bytes, num_classes: int) -> int | None:
    """The class id of a ``.cls`` payload, or None when it does not follow the label grammar; raises
    :class:`LabelOutOfRange` for a well-formed value >= ``num_classes``."""
    text = raw.strip(LABEL_WHITESPACE)
    if not text or len(text) > MAX_LABEL_DIGITS or not all(48 <= b <= 57 for b in text):
        return None
    value = int(text)
    if value >= num_classes:
        raise LabelOutOfRange(value, num_classes)
    return value


def pad_label_rows(payloads: Sequence[np.ndarray]) -> np.ndarray:
    """int16 [B, L] of B uint8 payloads (L the longest), each row filled past its end with ``LABEL_PAD``."""
    for i, payload in enumerate(payloads):
        if payload.dtype != np.uint8:  # a signed byte 0xFF would read as LABEL_PAD
            raise ValueError(f"label payload {i} must be uint8 bytes, got dtype {payload.dtype}")
    lengths = np.fromiter((len(p) for p in payloads), dtype=np.int64, count=len(payloads))
    width = int(lengths.max(initial=0))
    padded = np.full((len(payloads), width), LABEL_PAD, dtype=np.int16)
    if width:
        padded[np.arange(width) < lengths[:, None]] = np.concatenate([np.ravel(p) for p in payloads])  # row-major
    return padded


def parse_label_rows(raw: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(int64 [B] class ids, bool [B] valid) of payloads padded with ``LABEL_PAD`` into an integer
    [B, L] array; the value of an invalid row is meaningless. Same grammar as :func:`parse_label`, but a
    value >= ``num_classes`` is only marked invalid (the caller probes the row with :func:`parse_label`)."""
    if raw.ndim != 2:
        raise ValueError(f"padded labels must be a [batch, length] array, got shape {raw.shape}")
    raw = raw.astype(np.int64)
    space = np.isin(raw, np.frombuffer(LABEL_WHITESPACE, dtype=np.uint8).astype(np.int64)) | (raw == LABEL_PAD)
    digit = (raw >= 48) & (raw <= 57)
    started = np.cumsum(digit, axis=1) > 0
    ended = np.cumsum(space & started, axis=1) > 0
    ndigits = digit.sum(axis=1)
    ok = (ndigits > 0) & (ndigits <= MAX_LABEL_DIGITS) & (digit | space).all(axis=1) & ~(digit & ended).any(axis=1)
    values = np.zeros(raw.shape[0], dtype=np.int64)
    for col in range(raw.shape[1]):
        values = np.where(digit[:, col] & ok, values * 10 + raw[:, col] - 48, values)
    return values, ok & (values < num_classes)
