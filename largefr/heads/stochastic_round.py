"""Stochastic rounding of fp32 values to bf16 / fp16 storage, seeded and deterministic.

Round-to-nearest loses every update smaller than half an ulp of the stored value: a bf16 weight of
magnitude 0.01 has an ulp of 2^-14 (6e-5), so SGD steps of lr * g ~ 1e-5 never change it. Stochastic
rounding (Gupta et al. 2015, "Deep learning with limited numerical precision") rounds x up to the next
representable value hi with probability (x - lo) / (hi - lo) and down to lo otherwise, so
E[round(x)] = x and small updates accumulate in expectation.

- bf16 is the top 16 bits of fp32: add 16 uniform random bits to the fp32 bit pattern and truncate the
  low 16 (sign-magnitude, so the same holds for negative values). No extra pass tests for non-finite
  values: +-inf stays +-inf (the carry stays in the dropped bits) and so do the NaNs arithmetic produces
  (quiet NaN, payload in the high mantissa bits); only a NaN whose payload lies entirely in the low 16
  bits can round to inf (still non-finite). Values that round past the largest bf16 become inf.
- fp16 (5 exponent bits, 10 mantissa bits): the spacing of fp16 at |x| is 2^(e - 11) for
  x = m 2^e, m in [0.5, 1), and 2^-24 in the subnormal range; round floor(x / spacing + u) * spacing with
  u ~ U[0, 1) in fp32 (the power-of-two division is exact; u keeps the 13 bits below |x / spacing| < 2^11,
  a bias below 2^-13 ulp). Values beyond the fp16 range become +-inf, as with round-to-nearest.

The random numbers come from the caller's torch.Generator, so a given seed gives the same result.
"""
from __future__ import annotations

import math

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)
_FP16_MANTISSA_BITS = 11  # with the implicit bit
_FP16_MIN_EXPONENT = -24  # spacing of the subnormals


def round_stochastic(values: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None) -> torch.Tensor:
    """``values`` (fp32) rounded stochastically to ``dtype`` (bf16 or fp16); fp32 is returned as is."""
    if values.dtype != torch.float32:
        raise TypeError(f"stochastic rounding reads fp32 values, got {values.dtype}")
    if dtype == torch.float32:
        return values
    if dtype == torch.bfloat16:
        return _round_bf16(values, generator)
    if dtype == torch.float16:
        return _round_fp16(values, generator)
    raise ValueError(f"stochastic rounding targets {LOW_PRECISION} (or float32 for none), got {dtype}")


def _round_bf16(values: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    bits = values.contiguous().view(torch.int32)
    # adding below the kept bits carries into the mantissa (or exponent) with probability = the dropped fraction
    rounded = torch.add(bits, _random_low_halves(values.shape, values.device, generator)).bitwise_and_(-65536)  # 0xFFFF0000
    return rounded.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


def _random_low_halves(shape: torch.Size, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """int32 values uniform in [0, 2^16): four per full-range 64-bit draw (a quarter of the RNG calls)."""
    numel = math.prod(shape)
    draws = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None, generator=generator)
    return draws.view(torch.uint16)[:numel].view(shape).to(torch.int32)  # zero-extended: no masking pass


def _round_fp16(values: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    _, exponent = torch.frexp(values)
    spacing = torch.ldexp(torch.ones_like(values), (exponent - _FP16_MANTISSA_BITS).clamp_min(_FP16_MIN_EXPONENT))
    noise = torch.rand(values.shape, generator=generator, device=values.device)
    rounded = torch.floor(values / spacing + noise).mul_(spacing)
    return torch.where(torch.isfinite(values), rounded, values).to(torch.float16)
