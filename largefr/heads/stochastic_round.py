"""Stochastic rounding of fp32 values to bf16 / fp16 storage, seeded and deterministic.

Round-to-nearest loses every update smaller than half an ulp of the stored value: a bf16 weight of
magnitude 0.01 has an ulp of 2^-14 (6e-5), so SGD steps of lr * g ~ 1e-5 never change it. Stochastic
rounding (Gupta et al. 2015, "Deep learning with limited numerical precision") rounds x up to the next
representable value hi with probability (x - lo) / (hi - lo) and down to lo otherwise, so
E[round(x)] = x and small updates accumulate in expectation.

Both formats draw one uniform 16-bit integer k per value (``random_halves``):
- bf16 is the top 16 bits of fp32: add k to the fp32 bit pattern and keep the high 16 bits (sign-magnitude,
  so the same holds for negative values); the probability of rounding up is exactly the dropped fraction.
  The result is a view of those halves (one pass: the add, into caller's scratch when given). No extra pass
  tests for non-finite values: +-inf stays +-inf (the carry stays in the dropped bits) and so do the NaNs
  arithmetic produces (quiet NaN, payload in the high mantissa bits); only a NaN whose payload lies entirely
  in the low 16 bits can round to inf (still non-finite). Values that round past the largest bf16 become inf.
- fp16 (5 exponent bits, 10 mantissa bits): in fp16's normal range (|x| >= 2^-14) fp16 keeps the top 10 of
  fp32's 23 stored mantissa bits, so the bf16 rule applies with 13 bits: add k >> 3 to the bit pattern and
  clear the low 13 bits; the result is exactly representable in fp16 and exactly unbiased. Below 2^-14 the
  fp16 spacing is 2^-24 whatever the exponent: x is first moved by m = copysign(2^-14, x), which puts x + m
  at exponent -14, where fp32's low 13 bits are again the dropped ones; the same rule rounds x + m and
  subtracting m is exact. Forming x + m rounds away bits of x below 2^-37 (an error below 2^-14 of the spacing,
  in fp16's subnormal range only). +-inf and quiet NaNs stay as they are; values that round past the
  largest fp16 become +-inf, as with round-to-nearest. All of it is a few vectorised integer and float passes
  (no frexp / ldexp, which torch's CPU kernels do not vectorise: ~0.8 s per 1M-class step before).

Several tensors rounded in the same place (the optimizer's W rows and their state rows) may share one
draw: each one's rounding is still unbiased; their errors are correlated with each other, not over steps.

Noise sources (``rounding_source``): on the CPU numpy's SFC64 bit generator (a small chaotic counter-based
generator that passes PractRand and BigCrush; measured here 0.56 ms per 2^20 random halves against 0.79 for
numpy's PCG64DXSM and ~3x less than torch's CPU generator, mt19937, which was the largest cost of a bf16
step after the GEMMs); on an accelerator a torch.Generator on that device (Philox, generated on the device). Either
way a seed gives the same bits every time.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)
_FP16_DROPPED_BITS = 13  # fp32's 23 stored mantissa bits minus fp16's 10
_FP16_MIN_NORMAL = 2.0**-14  # below it fp16's spacing is 2^-24 (subnormals)
_HIGH_HALF = 1 if sys.byteorder == "little" else 0  # index of an int32's high 16 bits among its two int16


@dataclass
class HostNoise:
    """A seeded stream of random 64-bit words in host memory (numpy's SFC64)."""

    seed: int
    _bits: np.random.SFC64 = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._bits = np.random.SFC64(self.seed)

    def words(self, count: int) -> torch.Tensor:
        """``count`` uniform int64 words (all 64 bits random) on the CPU."""
        return torch.from_numpy(self._bits.random_raw(count).view(np.int64))


NoiseSource = torch.Generator | HostNoise


def rounding_source(device: torch.device, seed: int) -> NoiseSource | None:
    """The noise source for rounding tensors on ``device``, seeded; None on the meta device (no values)."""
    if device.type == "meta":
        return None
    if device.type == "cpu":
        return HostNoise(seed)
    return torch.Generator(device=device).manual_seed(seed)


def random_words16(numel: int, device: torch.device, source: NoiseSource | None) -> torch.Tensor:
    """uint16 [numel] uniform 16-bit words, four per random 64-bit word of ``source`` (the draws of
    :func:`random_halves`, before widening; the host SGD kernel reads them as they are)."""
    count = (numel + 3) // 4
    if isinstance(source, HostNoise):
        words = source.words(count).to(device)
    else:
        words = torch.empty(count, dtype=torch.int64, device=device).random_(-(2**63), None, generator=source)
    return words.view(torch.uint16)[:numel]


def random_halves(
    numel: int, device: torch.device, source: NoiseSource | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """int32 [numel] uniform in [0, 2^16): four per random 64-bit word, zero-extended (no masking pass).

    ``out``: a contiguous int32 tensor of at least ``numel`` elements on ``device`` to fill instead of a new one."""
    halves = random_words16(numel, device, source)
    if out is None:
        return halves.to(torch.int32)
    if out.dtype != torch.int32 or not out.is_contiguous() or out.numel() < numel:
        raise ValueError(f"out must be contiguous int32 with >= {numel} elements, got {out.dtype} {tuple(out.shape)}")
    return out.view(-1)[:numel].copy_(halves)


def round_stochastic(
    values: torch.Tensor, dtype: torch.dtype, source: NoiseSource | None, halves: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """``values`` (fp32) rounded stochastically to ``dtype`` (bf16 or fp16); fp32 is returned as is.

    ``halves``: this call's random integers (``random_halves`` of values.numel(), e.g. shared with other
    tensors of the same shape); drawn from ``source`` when None. ``scratch``: a contiguous int32 tensor of
    values' shape that bf16 rounding works in; the bf16 result is then a (strided) view of it, valid until
    ``scratch`` is reused (without it, a new contiguous tensor).
    """
    if values.dtype != torch.float32:
        raise TypeError(f"stochastic rounding reads fp32 values, got {values.dtype}")
    if dtype == torch.float32:
        return values
    if dtype not in LOW_PRECISION:
        raise ValueError(f"stochastic rounding targets {LOW_PRECISION} (or float32 for none), got {dtype}")
    numel = math.prod(values.shape)
    if halves is None:
        halves = random_halves(numel, values.device, source)
    elif halves.numel() != numel or halves.dtype != torch.int32:
        raise ValueError(f"halves must be int32 with {numel} elements, got {halves.dtype} with {halves.numel()}")
    halves = halves.view(values.shape)
    if dtype == torch.bfloat16:
        return _round_bf16(values, halves, scratch)
    return _round_fp16(values, halves)


def _round_bf16(values: torch.Tensor, halves: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    bits = values.contiguous().view(torch.int32)
    # adding below the kept bits carries into the mantissa (or exponent) with probability = the dropped fraction
    if scratch is None:
        return _high_halves(torch.add(bits, halves)).contiguous()  # not a view pinning twice the bytes
    if scratch.dtype != torch.int32 or scratch.shape != bits.shape or not scratch.is_contiguous():
        raise ValueError(f"scratch must be contiguous int32 of shape {tuple(bits.shape)}, got {scratch.dtype} "
                         f"{tuple(scratch.shape)} (contiguous: {scratch.is_contiguous()})")
    return _high_halves(torch.add(bits, halves, out=scratch))


def _high_halves(rounded: torch.Tensor) -> torch.Tensor:
    """The bf16 bit patterns of int32 ``rounded`` (its high 16 bits, low bits dropped), as a strided view."""
    return rounded.view(torch.int16).unflatten(-1, (-1, 2))[..., _HIGH_HALF].view(torch.bfloat16)


def _round_fp16(values: torch.Tensor, halves: torch.Tensor) -> torch.Tensor:
    # m = copysign(2^-14, x) below fp16's normal range, +-0 elsewhere (adding and subtracting it is then exact)
    move = values.abs().lt_(_FP16_MIN_NORMAL).copysign_(values).mul_(_FP16_MIN_NORMAL)
    bits = torch.add(values, move).view(torch.int32)
    noise = torch.bitwise_right_shift(halves, 16 - _FP16_DROPPED_BITS)
    rounded = bits.add_(noise).bitwise_and_(-(1 << _FP16_DROPPED_BITS)).view(torch.float32)
    return rounded.sub_(move).to(torch.float16)  # exact: a multiple of fp16's spacing (or past its range: inf)
