"""Row-sparse optimizers for the head's W slice: cost follows the rows sampled in the step.

Each step reads the head's row gradient (ids, rows) and updates only those rows of W and of the
optimizer state, using torch's fused single-pass kernels on the gathered rows. State is one
slice-sized tensor per state variable (momentum; or exp_avg and exp_avg_sq), allocated zeroed once.

Difference from a dense optimizer over the whole slice ("lazy" semantics, as SparseAdam/LazyAdam):
rows not sampled in a step are left untouched: no momentum decay, no weight decay, no update from
their stale momentum. For SGD with r = 1 this is exactly torch.optim.SGD. AdamW uses one global
step count for the bias correction of every row (like torch.optim.SparseAdam), so a row first
sampled at step t is corrected as if it had been seen since step 1.

State may be stored in 16 bits (``state_dtype``, default: W's dtype) and W itself in 16 bits or on
another device (the head's largefr.heads.weight_store.WeightStore): each block's rows and state are
gathered into fp32 buffers on the compute device, updated there by the fused kernels, and written back
with stochastic rounding (largefr.heads.stochastic_round) from a noise source seeded by (head seed, rank,
the head's forward count), so a run is deterministic for its seed and world size and resumes exactly.
On the CPU, SGD over sampled rows (fp32 or bf16 W and momentum) runs all of that for a block in one
compiled pass with the same arithmetic and noise (largefr.heads.host_kernel), where a C compiler is available.

Both are torch.optim.Optimizer subclasses over [head.weight], so LR schedulers, ``state_dict()`` and
``load_state_dict()`` work as usual; ``zero_grad()`` clears the head's row-gradient record.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch.optim.adamw import adamw
from torch.optim.sgd import sgd

from largefr.seeding import derive_seed
from largefr.heads.host_kernel import host_kernels, kernel_applies, sgd_rows_
from largefr.heads.row_grad import SparseRowGrad, block_rows
from largefr.heads.stochastic_round import NoiseSource, random_halves, random_words16, rounding_source
from largefr.heads.weight_store import WeightStore, resolve_dtype


@runtime_checkable
class RowGradSource(Protocol):
    """What a row-sparse optimizer steps (e.g. PartialFC): a weight matrix and its pending row gradient, where
    W is stored (``store``) and computed on (``compute_device``), and what seeds the rounding stream."""

    weight: torch.nn.Parameter
    store: WeightStore
    seed: int
    rank: int
    training_forwards: int

    @property
    def compute_device(self) -> torch.device:
        ...

    def take_row_grad(self) -> SparseRowGrad | None:
        """The gradient recorded since the last zero_grad, handed over (the record is emptied)."""
        ...

    def zero_grad(self, set_to_none: bool = True) -> None:
        ...


def _fused_ok(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda")


class _RowSparseOptimizer(torch.optim.Optimizer):
    state_names: tuple[str, ...] = ()

    def __init__(self, head: RowGradSource, defaults: dict[str, Any], state_dtype: torch.dtype | str | None = None) -> None:
        if not isinstance(head, RowGradSource):
            raise TypeError(
                f"a row-sparse optimizer needs a head with weight, store, compute_device, take_row_grad() and "
                f"zero_grad() (e.g. PartialFC), got {type(head).__name__}"
            )
        self.head = head
        self.state_dtype = resolve_dtype(state_dtype, "state_dtype", default=head.weight.dtype)
        super().__init__([head.weight], defaults)
        self.state[head.weight] = {name: self._new_state() for name in self._active_state_names()}

    def _new_state(self, value: torch.Tensor | None = None) -> torch.Tensor:
        """A slice-sized state tensor in ``state_dtype`` where W is stored (zeros, or ``value`` converted)."""
        weight = self.head.weight.detach()
        out = self.head.store.allocate(weight, self.state_dtype, self.head.compute_device)
        if value is not None:
            out.copy_(value)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts loaded state to the parameter's dtype and device; keep the state's own dtype and storage
        super().load_state_dict(state_dict)
        state = self.state[self.head.weight]
        for name in self.state_names:
            if name in state:
                state[name] = self._new_state(state[name])
        if "step" in state:
            state["step"] = state["step"].to(device=self.head.compute_device, dtype=torch.float32)

    def _active_state_names(self) -> tuple[str, ...]:
        return self.state_names

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.head.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        row_grad = self.head.take_row_grad()
        if row_grad is not None:
            self._apply(row_grad)
        return loss

    def _apply(self, row_grad: SparseRowGrad) -> None:
        """Update the rows in blocks: form the block's gradient, gather its state, step, scatter back.

        Each block's rows, gradient and state stay in cache from the gradient's formation (a small GEMM
        when it is still factored, plus the radial projection) through the fused update to the
        write-back; the block buffers are allocated once per optimizer.
        """
        weight, store, device = self.head.weight.detach(), self.head.store, self.head.compute_device
        state = self.state[self.head.weight]
        for name in self._active_state_names():  # e.g. momentum switched on by a scheduler or a loaded state
            if name not in state:
                state[name] = self._new_state()
        buffers = [state[name] for name in self._active_state_names()]
        ids = row_grad.ids
        scratch, grad_buf, rows_buf, *state_bufs = self._block_buffers(len(buffers) + 3, weight.shape[1], device)
        low_precision = any(t.dtype != torch.float32 for t in (weight, *buffers))
        rounding = self._rounding_source(device) if low_precision else None
        host_step = self._host_step(weight, buffers, ids, device)
        step = block_rows(device)
        for a in range(0, row_grad.num_rows, step):
            b = min(a + step, row_grad.num_rows)
            if row_grad.rows is not None and row_grad.rows.dtype == torch.float32:  # gathered in the forward
                rows, in_place = row_grad.rows[a:b], False
            elif row_grad.rows is not None:  # gathered in 16 bits for the GEMMs: the update runs in fp32
                rows, in_place = rows_buf[: b - a].copy_(row_grad.rows[a:b]), False
            else:
                rows, in_place = store.read_rows(weight, ids, a, b, rows_buf[: b - a])
            grad = row_grad.grad_block(a, b, rows, grad_buf[: b - a], scratch[: b - a])
            if host_step is not None:  # the same update, rounding draws and bits, in one compiled pass
                assert ids is not None
                host_step(ids[a:b], rows, grad, None if rounding is None else random_words16(rows.numel(), device, rounding))
                continue
            block_state = [store.read_rows(full, ids, a, b, out[: b - a]) for full, out in zip(buffers, state_bufs)]
            if not rows.is_meta:  # torch's update kernels have no meta version; in place, they allocate nothing
                self._update(rows, grad, [rows_state for rows_state, _ in block_state])
            # one draw per block, shared by W and its states (each rounding stays unbiased); the gradient and
            # scratch buffers are free once the update has run: they hold the draw and the rounded bits
            halves = None if rounding is None else random_halves(rows.numel(), device, rounding, grad_buf.view(torch.int32))
            rounded = scratch[: b - a].view(torch.int32)
            if not in_place:
                store.write_rows(weight, ids, a, b, rows, rounding, halves, rounded)
            for full, (rows_state, view) in zip(buffers, block_state):
                if not view:
                    store.write_rows(full, ids, a, b, rows_state, rounding, halves, rounded)

    def steps_sampled_rows_on_host_kernel(self) -> bool:
        """True when a step over sampled rows (r < 1) runs the compiled host kernel (largefr.heads.host_kernel)."""
        state = [self.state[self.head.weight][name] for name in self._active_state_names()
                 if name in self.state[self.head.weight]]
        no_ids = torch.empty(0, dtype=torch.int64)
        return self._host_step(self.head.weight.detach(), state, no_ids, self.head.compute_device) is not None

    def _host_step(
        self, weight: torch.Tensor, state: list[torch.Tensor], ids: torch.Tensor | None, device: torch.device
    ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], None] | None:
        """A compiled host kernel that updates and writes back sampled rows in one pass
        (largefr.heads.host_kernel), or None to use torch's kernels; called with (ids, rows, grad, noise)."""
        return None

    def _rounding_source(self, device: torch.device) -> NoiseSource | None:
        """Stochastic-rounding stream of this step: seeded by (head seed, rank, head forward count)."""
        head = self.head
        return rounding_source(device, derive_seed(head.seed, "head_rounding", head.rank, head.training_forwards))

    def _block_buffers(self, count: int, dim: int, device: torch.device) -> list[torch.Tensor]:
        """fp32 block buffers on the compute device (rows, gradient, scratch, one per state)."""
        shape = (block_rows(device), dim)
        cached = getattr(self, "_blocks", [])
        if len(cached) != count or cached[0].shape != shape or cached[0].device != device:
            self._blocks = [torch.empty(shape, dtype=torch.float32, device=device) for _ in range(count)]
        return self._blocks

    def _update(self, rows: torch.Tensor, grad: torch.Tensor, state_rows: list[torch.Tensor]) -> None:
        raise TypeError(f"{type(self).__name__} must define _update")


class RowSparseSGD(_RowSparseOptimizer):
    """SGD with momentum (torch convention: buf = mu*buf + g + wd*w; w -= lr*buf) on sampled rows."""

    state_names = ("momentum_buffer",)

    def __init__(
        self, head: RowGradSource, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
        state_dtype: torch.dtype | str | None = None,
    ) -> None:
        _check_hyper(lr=lr, momentum=momentum, weight_decay=weight_decay)
        if nesterov and momentum <= 0:
            raise ValueError(f"nesterov needs momentum > 0, got momentum={momentum}")
        super().__init__(head, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov), state_dtype)

    def _active_state_names(self) -> tuple[str, ...]:
        # read at each step: schedulers (OneCycleLR) and load_state_dict change the group's momentum
        return self.state_names if self.param_groups[0]["momentum"] > 0 else ()

    def _host_step(
        self, weight: torch.Tensor, state: list[torch.Tensor], ids: torch.Tensor | None, device: torch.device
    ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], None] | None:
        momentum = state[0] if state else None
        if ids is None or not kernel_applies(weight, momentum, device):  # every row: updated in place already
            return None
        library = host_kernels()
        if library is None:
            return None
        group = self.param_groups[0]
        lr, mu, wd, nesterov = float(group["lr"]), float(group["momentum"]), float(group["weight_decay"]), group["nesterov"]

        def host_step(block_ids: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, noise: torch.Tensor | None) -> None:
            sgd_rows_(library, block_ids, rows, grad, weight, momentum, noise, lr, mu, wd, nesterov)

        return host_step

    def _update(self, rows: torch.Tensor, grad: torch.Tensor, state_rows: list[torch.Tensor]) -> None:
        group = self.param_groups[0]
        sgd(
            [rows], [grad], [state_rows[0] if state_rows else None],
            fused=_fused_ok(rows.device) and bool(state_rows), foreach=False if not state_rows else None,
            weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
            dampening=0.0, nesterov=group["nesterov"], maximize=False,
        )


class RowSparseAdamW(_RowSparseOptimizer):
    """AdamW (decoupled weight decay) on sampled rows, global bias-correction step."""

    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(
        self, head: RowGradSource, lr: float, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8, weight_decay: float = 0.01, state_dtype: torch.dtype | str | None = None,
    ) -> None:
        _check_hyper(lr=lr, weight_decay=weight_decay, eps=eps, beta1=betas[0], beta2=betas[1])
        super().__init__(head, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay), state_dtype)
        self.state[head.weight]["step"] = torch.zeros((), dtype=torch.float32, device=head.compute_device)

    def _apply(self, row_grad: SparseRowGrad) -> None:
        step = self.state[self.head.weight]["step"]
        self._step_before = step.clone()
        super()._apply(row_grad)
        step.add_(1)

    def _update(self, rows: torch.Tensor, grad: torch.Tensor, state_rows: list[torch.Tensor]) -> None:
        group = self.param_groups[0]
        step = self._step_before.clone()  # the fused kernel increments the copy it is given; once per block
        adamw(
            [rows], [grad], [state_rows[0]], [state_rows[1]], [], [step],
            fused=_fused_ok(rows.device), amsgrad=False, beta1=group["betas"][0], beta2=group["betas"][1],
            lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
        )


def _check_hyper(**values: float) -> None:
    for name, value in values.items():
        limit_one = name in ("momentum", "beta1", "beta2")
        if not (value >= 0 and (value < 1 or not limit_one)):
            expected = "in [0, 1)" if limit_one else ">= 0"
            raise ValueError(f"{name} must be {expected}, got {value!r}")


OPTIMIZERS: dict[str, type[_RowSparseOptimizer]] = {"sgd": RowSparseSGD, "adamw": RowSparseAdamW}


def build_row_optimizer(head: RowGradSource, name: str, **hyper: Any) -> _RowSparseOptimizer:
    key = name.lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown head optimizer {name!r}; expected one of {sorted(OPTIMIZERS)}")
    try:
        return OPTIMIZERS[key](head, **hyper)
    except TypeError as exc:
        raise ValueError(f"bad arguments {hyper} for head optimizer {name!r}: {exc}") from exc
