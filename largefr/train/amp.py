"""Mixed precision: autocast by name, and a dynamic loss scaler that also covers the head's row gradient.

fp32: no autocast. bf16: autocast to bfloat16 (CPU or GPU), no scaling needed. fp16: autocast to float16
with dynamic loss scaling. torch.amp.GradScaler only unscales and checks the ``.grad`` of an optimizer's
parameters; the Partial FC head's W gradient is a row record outside autograd, so :class:`LossScaler`
takes the gradient tensors explicitly (backbone grads + the head's row grad) and agrees on "found inf"
over all ranks (the head's rows differ per rank), so every rank skips the same steps. The update rule is
GradScaler's (same kernels): halve on overflow, double after ``growth_interval`` clean steps.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ContextManager, Sequence

import torch
from torch.distributed import ProcessGroup

from largefr.distributed import all_reduce_max_

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class LossScaler:
    """Dynamic loss scale (enabled for fp16); a disabled scaler is the identity and never skips."""

    def __init__(
        self,
        enabled: bool,
        device: torch.device,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        if not (init_scale > 0 and growth_factor > 1 and 0 < backoff_factor < 1 and growth_interval >= 1):
            raise ValueError(
                f"bad loss-scaler settings init_scale={init_scale}, growth_factor={growth_factor}, "
                f"backoff_factor={backoff_factor}, growth_interval={growth_interval}"
            )
        self.enabled = enabled
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self._scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self._growth_tracker = torch.zeros((), dtype=torch.int32, device=device)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self._scale if self.enabled else loss

    def unscale_(self, grads: Sequence[torch.Tensor], group: ProcessGroup) -> torch.Tensor:
        """Divide ``grads`` in place by the scale; 1.0 (on every rank) if any rank saw a non-finite value."""
        found_inf = torch.zeros((), dtype=torch.float32, device=self._scale.device)
        if not self.enabled:
            return found_inf
        inv_scale = self._scale.double().reciprocal().float()
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for same in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(same, found_inf, inv_scale)
        return all_reduce_max_(found_inf, group)

    def update(self, found_inf: torch.Tensor) -> None:
        if self.enabled:
            torch._amp_update_scale_(
                self._scale, self._growth_tracker, found_inf,
                self.growth_factor, self.backoff_factor, self.growth_interval,
            )

    def get_scale(self) -> float:
        """The current scale (a host sync: for logging and checkpoints only)."""
        return float(self._scale) if self.enabled else 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "scale": float(self._scale), "growth_tracker": int(self._growth_tracker)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if bool(state["enabled"]) != self.enabled:
            raise ValueError(
                f"checkpoint loss scaler enabled={state['enabled']} but this run's is enabled={self.enabled} "
                "(train.precision changed between save and resume?)"
            )
        self._scale.fill_(float(state["scale"]))
        self._growth_tracker.fill_(int(state["growth_tracker"]))


@dataclass
class Precision:
    """Autocast settings of one run plus its loss scaler."""

    name: str
    device: torch.device
    scaler: LossScaler = field(init=False)

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise ValueError(f"precision {self.name!r} is not one of {sorted(PRECISIONS)}")
        self.scaler = LossScaler(self.name == "fp16", self.device)

    @property
    def dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.name]

    def autocast(self) -> ContextManager[Any]:
        dtype = self.dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)
