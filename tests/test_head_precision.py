"""16-bit W / optimizer state with stochastic rounding, and host-resident (separate-buffer) storage."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from largefr import PartialFC, margins
from largefr.heads.stochastic_round import HostNoise, random_halves, round_stochastic, rounding_source
from multirank import run_ranks
from reference import ALL_MARGINS, reference_loss_and_grads

NUM_CLASSES, DIM, BATCH, SEED = 23, 16, 5, 7
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at |values| (fp32), subnormals included."""
    _, exponent = torch.frexp(values.float())
    mantissa, lowest = (8, -133) if dtype == torch.bfloat16 else (11, -24)
    return torch.ldexp(torch.ones_like(values.float()), (exponent - mantissa).clamp_min(lowest))


SOURCES = {"torch": lambda seed: torch.Generator().manual_seed(seed), "host": HostNoise}


@pytest.mark.parametrize("source", sorted(SOURCES))
@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_stochastic_rounding_is_unbiased_representable_and_seeded(name: str, source: str) -> None:
    dtype = DTYPES[name]
    x = torch.randn(4096, generator=torch.Generator().manual_seed(2)) * torch.logspace(-6, 3, 4096)
    gen = SOURCES[source](3)
    draws = torch.stack([round_stochastic(x, dtype, gen).float() for _ in range(400)])
    lo_hi = (draws - x).abs() <= _ulp(x, dtype)  # always one of the two neighbours
    assert lo_hi.all()
    # mean of 400 draws: within 6 standard errors (each <= ulp/2 / sqrt(400)) of x, for all 4096 values
    assert ((draws.mean(0) - x).abs() <= 6 * 0.5 * _ulp(x, dtype) / 20).all()
    again = round_stochastic(x, dtype, SOURCES[source](3))
    assert torch.equal(again.float(), draws[0])
    special = torch.tensor([float("inf"), float("-inf"), 0.0])
    assert torch.equal(round_stochastic(special, dtype, gen).float(), special)
    assert round_stochastic(torch.tensor([float("nan")]), dtype, gen).isnan().all()
    with pytest.raises(TypeError, match="fp32"):
        round_stochastic(x.double(), dtype, gen)


def test_shared_halves_round_each_tensor_as_its_own_draw_would() -> None:
    """W and its optimizer states share one draw per block: the same bits a single tensor would have used."""
    x = torch.randn(2, 700, generator=torch.Generator().manual_seed(4))
    halves = random_halves(x.numel(), x.device, HostNoise(11))
    for dtype in DTYPES.values():
        alone = round_stochastic(x, dtype, HostNoise(11))
        assert torch.equal(round_stochastic(x, dtype, None, halves).view(torch.int16), alone.view(torch.int16))
    assert halves.min() >= 0 and halves.max() < 2**16 and halves.unique().numel() > 1000
    with pytest.raises(ValueError, match="1400 elements"):
        round_stochastic(x, torch.bfloat16, None, halves[:10])
    assert isinstance(rounding_source(torch.device("cpu"), 1), HostNoise)
    assert rounding_source(torch.device("meta"), 1) is None


def test_rounding_into_caller_buffers_gives_the_same_bits() -> None:
    """The optimizer draws into its free gradient buffer and rounds bf16 in its scratch (a view of the high halves)."""
    x = torch.randn(3, 500, generator=torch.Generator().manual_seed(5)) * 1e-3
    fresh = random_halves(x.numel(), x.device, HostNoise(7))
    out = torch.full((4, 500), -1, dtype=torch.int32)
    drawn = random_halves(x.numel(), x.device, HostNoise(7), out)
    assert torch.equal(drawn, fresh) and drawn.data_ptr() == out.data_ptr() and (out[3] == -1).all()
    scratch = torch.empty(3, 500, dtype=torch.int32)
    in_scratch = round_stochastic(x, torch.bfloat16, None, fresh, scratch)
    assert in_scratch.dtype == torch.bfloat16 and in_scratch.untyped_storage().data_ptr() == scratch.data_ptr()
    expected = (x.view(torch.int32) + fresh.view(3, 500)).bitwise_and(-65536).view(torch.float32)
    assert torch.equal(in_scratch.float(), expected) and torch.equal(round_stochastic(x, torch.bfloat16, None, fresh), in_scratch)
    with pytest.raises(ValueError, match="contiguous int32"):
        random_halves(x.numel(), x.device, HostNoise(7), out[:1])
    with pytest.raises(ValueError, match="scratch must be contiguous int32"):
        round_stochastic(x, torch.bfloat16, None, fresh, scratch[:2])
    with pytest.raises(ValueError, match="contiguous: False"):
        round_stochastic(x, torch.bfloat16, None, fresh, torch.empty(500, 3, dtype=torch.int32).t())
    assert round_stochastic(x, torch.bfloat16, None, fresh).is_contiguous()


def test_least_squares_stalls_with_round_to_nearest_but_tracks_fp32_with_stochastic_rounding() -> None:
    """GD on ||A w - b||^2 / 2 with w stored in bf16: steps ~1e-4 are below half an ulp of w ~ 1 (2^-8)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(64, 16, generator=gen) / 8
    w_true = 1 + torch.rand(16, generator=gen)
    b = a @ w_true
    lr, steps = 2e-3, 3000
    w32 = torch.ones(16)
    w_rn = torch.ones(16, dtype=torch.bfloat16)
    w_sr = torch.ones(16, dtype=torch.bfloat16)
    rounding = torch.Generator().manual_seed(1)
    loss = lambda w: 0.5 * (a @ w.float() - b).square().sum().item()  # noqa: E731
    for _ in range(steps):
        w32 = w32 - lr * a.T @ (a @ w32 - b)
        w_rn = (w_rn.float() - lr * a.T @ (a @ w_rn.float() - b)).to(torch.bfloat16)
        w_sr = round_stochastic(w_sr.float() - lr * a.T @ (a @ w_sr.float() - b), torch.bfloat16, rounding)
    start = loss(torch.ones(16))
    assert loss(w_rn) > 0.9 * start  # round-to-nearest: (almost) no step survives the write-back
    assert loss(w32) < 0.3 * start
    assert abs(loss(w_sr) - loss(w32)) < 0.05 * start  # stochastic rounding follows fp32


def _global_batch(world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234 + world_size)
    return torch.randn(world_size * BATCH, DIM, generator=gen), torch.randint(0, NUM_CLASSES, (world_size * BATCH,), generator=gen)


def _low_precision_cases(ctx: Any) -> list[dict[str, Any]]:
    x_all, labels_all = _global_batch(ctx.world_size)
    rows = slice(ctx.rank * BATCH, (ctx.rank + 1) * BATCH)
    out = []
    for margin_index in (0, 3, 6):
        for rate in (1.0, 0.5):
            for name in DTYPES:
                head = PartialFC(ALL_MARGINS[margin_index], DIM, NUM_CLASSES, rate, ctx.group, seed=SEED, weight_dtype=name)
                opt = head.optimizer("sgd", lr=0.5, momentum=0.9)
                stored = head.weight.detach().float().clone()
                x = x_all[rows].clone().requires_grad_(True)
                loss = head(x, labels_all[rows])
                loss.backward()
                w_grad = head.row_grad().grad.clone()
                ids = head.sampled_class_ids.clone()
                opt.step()
                out.append(dict(margin=margin_index, rate=rate, name=name, loss=loss.item(), x_grad=x.grad, ids=ids,
                                w_grad=w_grad, stored=stored, after=head.weight.detach().clone(),
                                momentum=opt.state[head.weight]["momentum_buffer"].clone()))
    return out


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 2e-4) -> None:
    err = (actual.double() - expected).abs().max().item()
    assert err <= rel * expected.abs().max().item() + 1e-7, f"max abs error {err:.3e}"


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [3])
def test_16bit_head_matches_reference_on_its_stored_weights(world_size: int) -> None:
    """Rows are upcast exactly and computed on in fp32, so against the float64 reference on the *stored*
    (rounded) W, loss and gradients keep fp32 tolerances. After one SGD step every stored W and
    momentum value is one of the two 16-bit neighbours of the fp32 update (stochastic rounding)."""
    per_rank = run_ranks(_low_precision_cases, world_size)
    x_all, labels_all = _global_batch(world_size)
    for index in range(len(per_rank[0])):
        cases = [r[index] for r in per_rank]
        dtype = DTYPES[cases[0]["name"]]
        full_w = torch.cat([c["stored"] for c in cases])
        ids = torch.cat([c["ids"] for c in cases])
        columns = torch.searchsorted(ids, labels_all)
        loss, x_grad, w_grad = reference_loss_and_grads(ALL_MARGINS[cases[0]["margin"]], x_all, full_w[ids].double(), columns)
        offset, first = 0, 0
        for rank, c in enumerate(cases):
            assert abs(c["loss"] - loss) <= 1e-5 * max(1.0, abs(loss))
            _close(c["x_grad"], x_grad[rank * BATCH : (rank + 1) * BATCH])
            n = c["ids"].numel()
            grad = w_grad[offset : offset + n].float()
            _close(c["w_grad"], grad.double())
            local = c["ids"] - first
            momentum = grad  # first step: buf = g
            expected = c["stored"][local] - 0.5 * momentum
            assert c["after"].dtype == dtype and c["momentum"].dtype == dtype
            assert ((c["after"][local].float() - expected).abs() <= _ulp(expected, dtype) * 1.001 + 1e-6).all()
            assert ((c["momentum"][local].float() - momentum).abs() <= _ulp(momentum, dtype) * 1.001 + 1e-9).all()
            offset += n
            first += c["stored"].shape[0]


def _head_state(head: PartialFC, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from largefr.train.checkpoint import PerRank, RowShardedState
    from largefr.train.state import HeadWeight

    rng = head.get_extra_state()["rng"]
    return {"head": RowShardedState(HeadWeight(head), head.class_range, NUM_CLASSES),
            "opt": RowShardedState(opt, head.class_range, NUM_CLASSES),
            "forwards": {"n": head.training_forwards},
            "rng": PerRank({"rng": None if rng is None else rng.numpy().tobytes()})}


def _save(root: Path, head: PartialFC, opt: torch.optim.Optimizer, ctx: Any) -> Path:
    from largefr.train.checkpoint import save_checkpoint

    return save_checkpoint(root, head.training_forwards, _head_state(head, opt), ctx)


def _load(path: Path, head: PartialFC, opt: torch.optim.Optimizer, ctx: Any) -> None:
    from largefr.train.checkpoint import load_checkpoint

    loaded = load_checkpoint(path, _head_state(head, opt), ctx)
    head.training_forwards = int(loaded["forwards"]["n"])
    if loaded["rng"] is not None and loaded["rng"]["rng"] is not None:
        rng = torch.frombuffer(bytearray(loaded["rng"]["rng"]), dtype=torch.uint8)
        head.set_extra_state({**head.get_extra_state(), "rng": rng})


def _steps(ctx: Any, root: str, rate: float, name: str, opt_name: str, storage: str | None, resume: bool) -> dict[str, Any]:
    x_all, labels_all = _global_batch(ctx.world_size)
    rows = slice(ctx.rank * BATCH, (ctx.rank + 1) * BATCH)

    def build() -> tuple[PartialFC, torch.optim.Optimizer]:
        head = PartialFC(ALL_MARGINS[6], DIM, NUM_CLASSES, rate, ctx.group, seed=SEED, weight_dtype=name, storage_device=storage)
        hyper = dict(lr=0.3, momentum=0.9) if opt_name == "sgd" else dict(lr=1e-2)
        return head, head.optimizer(opt_name, **hyper)

    head, opt = build()
    losses = []
    for step in range(4):
        if step == 2 and resume:  # resume from a checkpoint into fresh objects
            path = _save(Path(root) / f"{rate}-{name}-{storage}", head, opt, ctx)
            head, opt = build()
            _load(path, head, opt, ctx)
        loss = head(x_all[rows] * (1 + 0.1 * step), labels_all[rows])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return dict(losses=losses, weight=head.weight.detach().clone(),
                state={k: v.clone() for k, v in opt.state[head.weight].items()})


def _resident_vs_separate(ctx: Any, root: str) -> dict[str, Any]:
    """Steps with W on the device (uninterrupted, and resumed) vs in a separate storage_device buffer (resumed)."""
    results: dict[str, Any] = {}
    for rate, name, opt_name in ((1.0, "fp32", "sgd"), (0.4, "bf16", "adamw")):
        runs = [_steps(ctx, root, rate, name, opt_name, storage, resume) for storage, resume in ((None, False), (None, True), ("cpu", True))]
        results[f"{rate}-{name}-{opt_name}"] = runs
    return results


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 3])
def test_separate_storage_is_bit_identical_to_resident_storage(world_size: int, tmp_path: Path) -> None:
    for per_rank in run_ranks(_resident_vs_separate, world_size, str(tmp_path)):
        for key, (uninterrupted, resident, separate) in per_rank.items():
            assert torch.equal(uninterrupted["weight"], resident["weight"]), f"{key}: resume changed the run"
            assert uninterrupted["losses"] == resident["losses"] == separate["losses"], key
            assert torch.equal(resident["weight"], separate["weight"]), key
            assert resident["state"].keys() == separate["state"].keys()
            for name, value in resident["state"].items():
                assert value.dtype == separate["state"][name].dtype and torch.equal(value, separate["state"][name]), (key, name)


def test_bad_weight_dtype_and_storage_device() -> None:
    with pytest.raises(ValueError, match="weight_dtype"):
        PartialFC(ALL_MARGINS[0], DIM, NUM_CLASSES, weight_dtype=torch.float64)
    with pytest.raises(ValueError, match="storage_device 'nowhere'"):
        PartialFC(ALL_MARGINS[0], DIM, NUM_CLASSES, storage_device="nowhere")
    head = PartialFC(ALL_MARGINS[0], DIM, NUM_CLASSES, weight_dtype="bf16")
    with pytest.raises(ValueError, match="state_dtype"):
        head.optimizer("sgd", lr=0.1, momentum=0.9, state_dtype="int8")
    assert head.optimizer("sgd", lr=0.1, momentum=0.9).state[head.weight]["momentum_buffer"].dtype == torch.bfloat16


def _fp32_to_bf16_and_back(ctx: Any, root: str) -> dict[str, Any]:
    """Train an fp32 head one step and save; load into a bf16 head, save; load into an fp32 head."""
    import logging

    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("largefr.train").addHandler(handler)
    heads = [PartialFC(ALL_MARGINS[6], DIM, NUM_CLASSES, 1.0, ctx.group, seed=SEED, weight_dtype=name) for name in ("fp32", "bf16", "fp32")]
    opts = [head.optimizer("sgd", lr=0.3, momentum=0.9) for head in heads]
    x_all, labels_all = _global_batch(ctx.world_size)
    heads[0](x_all[ctx.rank * BATCH : (ctx.rank + 1) * BATCH], labels_all[ctx.rank * BATCH : (ctx.rank + 1) * BATCH]).backward()
    opts[0].step()
    path = _save(Path(root) / "fp32", heads[0], opts[0], ctx)
    _load(path, heads[1], opts[1], ctx)
    _load(_save(Path(root) / "bf16", heads[1], opts[1], ctx), heads[2], opts[2], ctx)
    return dict(weights=[h.weight.detach().clone() for h in heads], messages=messages,
                momenta=[o.state[h.weight]["momentum_buffer"].clone() for h, o in zip(heads, opts)])


@pytest.mark.slow
def test_fp32_checkpoint_loads_into_a_bf16_head_and_back_and_says_so(tmp_path: Path) -> None:
    per_rank = run_ranks(_fp32_to_bf16_and_back, 2, str(tmp_path))
    for rank, result in enumerate(per_rank):
        (w32, w16, back), (m32, m16, m_back) = result["weights"], result["momenta"]
        assert w16.dtype == m16.dtype == torch.bfloat16 and back.dtype == m_back.dtype == torch.float32
        assert torch.equal(w16, w32.to(torch.bfloat16)) and torch.equal(m16, m32.to(torch.bfloat16))  # round to nearest
        assert torch.equal(back, w16.float()) and torch.equal(m_back, m16.float())  # and back, exactly
        if rank:
            assert result["messages"] == []  # said once, by rank 0
            continue
        first, second = result["messages"]
        assert "head.weight: torch.float32 -> torch.bfloat16 (rounded to nearest)" in first
        assert "momentum_buffer: torch.float32 -> torch.bfloat16 (rounded to nearest)" in first
        assert "head.weight: torch.bfloat16 -> torch.float32 (exactly)" in second


def _train_rows(weight_dtype: str, state_dtype: str, optimizer: str, storage: str, autocast: bool) -> list[torch.Tensor]:
    """W and optimizer state after 3 steps over > 2 update blocks (2048 rows each, the last one partial)."""
    head = PartialFC(margins.CosFace(scale=8.0), 16, 9000, 0.6, weight_dtype=weight_dtype, seed=4,
                     storage_device="cpu" if storage == "host" else None)
    hyper = dict(lr=0.5, momentum=0.9, weight_decay=5e-4) if optimizer == "sgd" else dict(lr=1e-2)
    opt = head.optimizer(optimizer, state_dtype=state_dtype, **hyper)
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = head(torch.randn(64, 16, generator=gen), torch.randint(0, 9000, (64,), generator=gen))
        loss.backward()
        opt.step()
    assert head.sampled_class_ids.numel() > 2 * 2048
    return [head.weight.detach().clone(), *[t.clone() for t in opt.state[head.weight].values() if t.dim() > 0]]


@pytest.mark.parametrize("weight_dtype, state_dtype, optimizer, storage, autocast", [
    ("bf16", "bf16", "sgd", "device", False), ("bf16", "fp32", "adamw", "host", False),
    ("fp32", "bf16", "sgd", "host", False), ("bf16", "bf16", "adamw", "device", True), ("fp16", "bf16", "sgd", "device", True),
])
def test_rounding_in_the_optimizers_block_buffers_equals_fresh_buffers(
    monkeypatch: pytest.MonkeyPatch, weight_dtype: str, state_dtype: str, optimizer: str, storage: str, autocast: bool
) -> None:
    """The draw lands in the gradient buffer and the bf16 bits in scratch once the update has run: the same bits
    as when both are fresh tensors, for W and every state, across several blocks (torch's kernels: SGD on the
    host otherwise runs the compiled kernel, tests/test_host_kernel.py)."""
    from largefr.heads import row_optim, weight_store

    monkeypatch.setenv("LARGEFR_HOST_KERNELS", "0")
    in_buffers = _train_rows(weight_dtype, state_dtype, optimizer, storage, autocast)
    fresh_halves, fresh_round = row_optim.random_halves, weight_store.round_stochastic
    monkeypatch.setattr(row_optim, "random_halves", lambda n, device, source, out=None: fresh_halves(n, device, source))
    monkeypatch.setattr(weight_store, "round_stochastic",
                        lambda values, dtype, source, halves=None, scratch=None: fresh_round(values, dtype, source, halves))
    fresh = _train_rows(weight_dtype, state_dtype, optimizer, storage, autocast)
    assert len(in_buffers) == len(fresh) >= 2
    for got, want in zip(in_buffers, fresh):
        assert got.dtype == want.dtype and torch.equal(got.view(torch.int16) if got.element_size() == 2 else got,
                                                       want.view(torch.int16) if want.element_size() == 2 else want)
