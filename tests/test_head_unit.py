"""Single-process tests of the head: sampling, precision, optimizers, accumulation, bad input."""
from __future__ import annotations

import math

import pytest
import torch

from largefr import PartialFC, margins
from largefr.heads import row_optim
from largefr.heads.sampling import init_weight_rows, sample_classes, shard_range
from reference import reference_loss_and_grads

DIM = 16


def make_batch(n: int, num_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, DIM, generator=gen), torch.randint(0, num_classes, (n,), generator=gen)


def test_shard_ranges_cover_classes_unevenly() -> None:
    for num_classes, world in [(23, 4), (10, 3), (7, 7), (1_000_003, 8)]:
        ranges = [shard_range(num_classes, world, r) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == num_classes
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [b - a for a, b in ranges]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="num_classes=2"):
        shard_range(2, 3, 0)


def test_initial_weight_independent_of_sharding() -> None:
    full = init_weight_rows(0, 10_000, 4, seed=3)  # spans three init blocks
    parts = [init_weight_rows(*shard_range(10_000, 3, r), 4, seed=3) for r in range(3)]
    assert torch.equal(torch.cat(parts), full)
    assert not torch.equal(init_weight_rows(0, 10, 4, seed=4), full[:10])


def test_sampling_keeps_positives_and_has_the_right_size() -> None:
    gen = torch.Generator().manual_seed(0)
    num_local = 100
    labels = torch.tensor([3, 3, 50, 99, 120, 7])  # 120 is owned by another rank
    owned = labels < num_local
    for rate, expected in [(0.1, 10), (0.25, 25), (1.0, 100), (0.0, 4), (0.01, 4)]:
        ids, cols = sample_classes(labels, owned, num_local, rate, gen)
        assert ids.numel() == expected, rate
        assert torch.equal(ids, torch.unique(ids))
        assert set(labels[owned].tolist()) <= set(ids.tolist())
        assert torch.equal(ids[cols[owned]], labels[owned])
        assert cols[~owned].tolist() == [-1]
    ids, _ = sample_classes(labels, owned, num_local, 0.0, gen)
    assert sorted(ids.tolist()) == [3, 7, 50, 99]  # r = 0: positives only (distinct)


def test_sampled_negatives_are_uniform() -> None:
    """Chi-square test: over many draws every non-positive class is picked equally often."""
    gen = torch.Generator().manual_seed(123)
    num_local, draws = 40, 4000
    labels = torch.tensor([0, 1, 2, 3])
    owned = torch.ones(4, dtype=torch.bool)
    counts = torch.zeros(num_local)
    for _ in range(draws):
        ids, _ = sample_classes(labels, owned, num_local, 0.25, gen)
        counts[ids] += 1
    assert torch.all(counts[:4] == draws)
    negatives = counts[4:]
    expected = draws * 6 / 36  # 10 sampled, 4 positives, 6 negatives among 36
    chi2 = float(((negatives - expected) ** 2 / expected).sum())
    # 35 degrees of freedom: P(chi2 > 66.6) ~ 0.001
    assert chi2 < 66.6, chi2


def test_rate_one_equals_unsampled_reference() -> None:
    x, labels = make_batch(12, 30)
    head = PartialFC(margins.ArcFace(scale=16.0), DIM, 30, sample_rate=1.0)
    xg = x.clone().requires_grad_(True)
    loss = head(xg, labels)
    loss.backward()
    ref_loss, ref_x, ref_w = reference_loss_and_grads(margins.ArcFace(scale=16.0), x, head.weight, labels)
    assert torch.equal(head.sampled_class_ids, torch.arange(30))
    assert head.row_grad().ids is None
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
    torch.testing.assert_close(xg.grad.double(), ref_x, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head.row_grad().grad.double(), ref_w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("margin", [margins.CosFace(scale=32.0), margins.Softmax(), margins.SphereFace()])
def test_bf16_autocast_close_to_fp32(margin: margins.Margin) -> None:
    x, labels = make_batch(16, 40, seed=5)
    results = []
    for autocast in (False, True):
        head = PartialFC(margin, DIM, 40, sample_rate=0.5, seed=1)
        xg = (x * 3).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = head(xg, labels)
        assert loss.dtype == torch.float32
        loss.backward()
        results.append((loss.item(), xg.grad.clone(), head.row_grad().grad.clone()))
    (l32, gx32, gw32), (l16, gx16, gw16) = results
    assert l16 == pytest.approx(l32, rel=2e-2)
    assert (gx16 - gx32).norm() / gx32.norm() < 3e-2
    assert (gw16 - gw32).norm() / gw32.norm() < 3e-2


def test_chunked_logits_equal_whole() -> None:
    x, labels = make_batch(10, 25, seed=2)
    grads = []
    for chunk in (None, 3, 1):
        head = PartialFC(margins.CombinedMargin(scale=16.0), DIM, 25, sample_rate=0.6, seed=4, chunk_rows=chunk)
        xg = x.clone().requires_grad_(True)
        loss = head(xg, labels)
        loss.backward()
        grads.append((loss.item(), xg.grad, head.row_grad().grad, head.sampled_class_ids))
    for loss, gx, gw, ids in grads[1:]:
        assert loss == pytest.approx(grads[0][0], rel=1e-6)
        torch.testing.assert_close(gx, grads[0][1], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gw, grads[0][2], rtol=1e-5, atol=1e-5)
        assert torch.equal(ids, grads[0][3])


def _check_one_step_against_dense(name: str, hyper: dict, dense_cls: type, dense_hyper: dict) -> None:
    x, labels = make_batch(12, 60, seed=9)
    head = PartialFC(margins.ArcFace(scale=16.0), DIM, 60, sample_rate=0.3, seed=2)
    opt = head.optimizer(name, **hyper)
    before = head.weight.detach().clone()
    head(x.requires_grad_(True), labels).backward()
    row_grad = head.row_grad()
    ids, grad = row_grad.ids, row_grad.grad.clone()
    assert ids is not None and ids.numel() == math.ceil(0.3 * 60)
    opt.step()
    rows = before[ids].clone().requires_grad_(True)
    rows.grad = grad
    dense = dense_cls([rows], **dense_hyper)
    dense.step()
    after = head.weight.detach()
    torch.testing.assert_close(after[ids], rows.detach(), rtol=1e-6, atol=1e-7)
    untouched = torch.ones(60, dtype=torch.bool)
    untouched[ids] = False
    assert torch.equal(after[untouched], before[untouched])
    assert head.row_grad() is None  # consumed by the step


@pytest.mark.parametrize("block_rows", [2048, 4])
def test_sgd_row_update_equals_dense_sgd_on_sampled_rows(block_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(row_optim, "block_rows", lambda device: block_rows)
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    _check_one_step_against_dense("sgd", hyper, torch.optim.SGD, hyper)


@pytest.mark.parametrize("block_rows", [2048, 4])
def test_adamw_row_update_equals_dense_adamw_on_sampled_rows(block_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(row_optim, "block_rows", lambda device: block_rows)
    hyper = dict(lr=1e-2, weight_decay=0.05)
    _check_one_step_against_dense("adamw", hyper, torch.optim.AdamW, hyper)


def test_sgd_at_rate_one_matches_torch_sgd_over_steps() -> None:
    x, labels = make_batch(8, 20, seed=3)
    head = PartialFC(margins.CosFace(scale=16.0), DIM, 20)
    opt = head.optimizer("sgd", lr=0.2, momentum=0.9, weight_decay=1e-3, nesterov=True)
    shadow = head.weight.detach().clone().requires_grad_(True)
    dense = torch.optim.SGD([shadow], lr=0.2, momentum=0.9, weight_decay=1e-3, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    dense_sched = torch.optim.lr_scheduler.LambdaLR(dense, lambda s: 1.0 / (1 + s))
    for _ in range(4):
        head(x, labels).backward()
        shadow.grad = head.row_grad().grad.clone()
        opt.step(), dense.step(), sched.step(), dense_sched.step()
        opt.zero_grad()
    torch.testing.assert_close(head.weight.detach(), shadow.detach(), rtol=1e-6, atol=1e-7)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 / 5)


def test_sgd_follows_momentum_set_by_a_scheduler_or_a_loaded_state() -> None:
    # OneCycleLR cycles the group's momentum although the optimizer was built without it
    x, labels = make_batch(8, 20, seed=4)
    head = PartialFC(margins.CosFace(scale=16.0), DIM, 20)
    opt = head.optimizer("sgd", lr=0.1, momentum=0.0)
    shadow = head.weight.detach().clone().requires_grad_(True)
    dense = torch.optim.SGD([shadow], lr=0.1, momentum=0.0)
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10) for o in (opt, dense)]
    for _ in range(4):
        head(x, labels).backward()
        shadow.grad = head.row_grad().grad.clone()
        opt.step(), dense.step(), opt.zero_grad()
        for s in scheds:
            s.step()
    assert opt.param_groups[0]["momentum"] > 0
    torch.testing.assert_close(head.weight.detach(), shadow.detach(), rtol=1e-6, atol=1e-7)
    # a momentum-free state loaded into an optimizer built with momentum
    plain = PartialFC(margins.CosFace(scale=16.0), DIM, 20).optimizer("sgd", lr=0.1)
    with_momentum = PartialFC(margins.CosFace(scale=16.0), DIM, 20).optimizer("sgd", lr=0.1, momentum=0.9)
    with_momentum.load_state_dict(plain.state_dict())
    with_momentum.head(x, labels).backward()
    with_momentum.step()
    assert "momentum_buffer" not in with_momentum.state[with_momentum.head.weight]


def test_weight_update_does_not_read_embeddings_changed_after_backward() -> None:
    # one rank, fp32, unnormalised features: the W gradient must not alias the caller's tensor
    def run(backbone_first: bool) -> torch.Tensor:
        x, labels = make_batch(8, 20, seed=5)
        emb = torch.nn.Parameter(x)
        head = PartialFC(margins.Softmax(), DIM, 20)
        opts = [torch.optim.SGD([emb], lr=10.0), head.optimizer("sgd", lr=0.1)]
        head(emb, labels).backward()
        for opt in opts if backbone_first else opts[::-1]:
            opt.step()
        return head.weight.detach().clone()

    assert torch.equal(run(True), run(False))


def test_sample_size_is_the_exact_ceiling() -> None:
    from largefr.heads.sampling import num_sampled

    assert num_sampled(0.07, 100) == 7 and num_sampled(0.1, 1000) == 100 and num_sampled(0.105, 100) == 11
    assert num_sampled(1.0, 33) == 33 and num_sampled(0.0, 33) == 0


def test_optimizer_state_dict_round_trip() -> None:
    x, labels = make_batch(8, 20, seed=3)
    head = PartialFC(margins.ArcFace(scale=16.0), DIM, 20, sample_rate=0.5)
    opt = head.optimizer("adamw", lr=1e-3)
    head(x, labels).backward()
    opt.step()
    state = opt.state_dict()
    fresh = PartialFC(margins.ArcFace(scale=16.0), DIM, 20, sample_rate=0.5).optimizer("adamw", lr=5.0)
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["lr"] == 1e-3
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(fresh.state[fresh.head.weight][key], opt.state[head.weight][key])


def test_gradient_accumulation_sums_row_gradients() -> None:
    x, labels = make_batch(12, 40, seed=11)
    head = PartialFC(margins.CosFace(scale=16.0), DIM, 40, sample_rate=0.4, seed=6)
    parts = []
    for half in (slice(0, 6), slice(6, 12)):
        head(x[half], labels[half]).backward()
        record = head._pending[-1]
        record.materialize(head.weight.detach())
        parts.append((head.sampled_class_ids.clone(), record.grad.clone()))
    merged = head.row_grad()
    dense = torch.zeros(40, DIM)
    for ids, grad in parts:
        dense[ids] += grad
    assert torch.equal(merged.ids, torch.unique(torch.cat([p[0] for p in parts])))
    torch.testing.assert_close(merged.grad, dense[merged.ids])


def test_two_forwards_before_backward_do_not_share_buffers() -> None:
    x, labels = make_batch(10, 30, seed=12)
    head = PartialFC(margins.ArcFace(scale=16.0), DIM, 30, sample_rate=0.5, seed=1)
    xa, xb = x.clone().requires_grad_(True), (2 * x).requires_grad_(True)
    loss_a, loss_b = head(xa, labels), head(xb, labels)
    (loss_a + loss_b).backward()
    for xs, first in ((xa, True), (xb, False)):
        fresh = PartialFC(margins.ArcFace(scale=16.0), DIM, 30, sample_rate=0.5, seed=1)
        if not first:
            fresh(x, labels)  # advance the sampler to the second draw
        xf = xs.detach().clone().requires_grad_(True)
        fresh(xf, labels).backward()
        torch.testing.assert_close(xs.grad, xf.grad)


def test_frozen_embeddings_still_produce_weight_grad() -> None:
    x, labels = make_batch(6, 12)
    head = PartialFC(margins.NormFace(scale=8.0), DIM, 12)
    head(x, labels).backward()  # x needs no grad
    assert head.row_grad() is not None and head.row_grad().grad.abs().sum() > 0


@pytest.mark.parametrize(
    "embeddings, labels, error, match",
    [
        (torch.randn(4, DIM), torch.tensor([0, 1, 2, 10]), ValueError, "label 10 is outside"),
        (torch.randn(4, DIM), torch.tensor([0, -1, 2, 3]), ValueError, "label -1 is outside"),
        (torch.randn(4, DIM), torch.tensor([0.0, 1.0, 2.0, 3.0]), TypeError, "int64"),
        (torch.randn(4, DIM + 1), torch.tensor([0, 1, 2, 3]), ValueError, r"\[B, 16\]"),
        (torch.randn(4, DIM), torch.tensor([0, 1, 2]), ValueError, r"labels must be \[B=4\]"),
        (torch.randint(0, 5, (4, DIM)), torch.tensor([0, 1, 2, 3]), TypeError, "floating-point"),
        (torch.full((4, DIM), float("nan")), torch.tensor([0, 1, 2, 3]), ValueError, "NaN"),
        (torch.randn(0, DIM), torch.zeros(0, dtype=torch.long), ValueError, "B >= 1"),
    ],
)
def test_bad_input_raises(embeddings: torch.Tensor, labels: torch.Tensor, error: type, match: str) -> None:
    head = PartialFC(margins.ArcFace(), DIM, 10)
    with pytest.raises(error, match=match):
        head(embeddings, labels)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sample_rate=1.5), "sample_rate"),
        (dict(num_classes=0), "num_classes"),
        (dict(embedding_size=-3), "embedding_size"),
        (dict(chunk_rows=0), "chunk_rows"),
        (dict(margin="arcface"), "margin must be"),
    ],
)
def test_bad_constructor_arguments(kwargs: dict, match: str) -> None:
    args = dict(margin=margins.ArcFace(), embedding_size=DIM, num_classes=10)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        PartialFC(**args)


def test_bad_optimizer_arguments() -> None:
    head = PartialFC(margins.ArcFace(), DIM, 10)
    with pytest.raises(ValueError, match="unknown head optimizer 'lamb'"):
        head.optimizer("lamb", lr=0.1)
    with pytest.raises(ValueError, match="momentum must be in"):
        head.optimizer("sgd", lr=0.1, momentum=1.5)
    with pytest.raises(ValueError, match="bad arguments"):
        head.optimizer("sgd", learning_rate=0.1)


def test_bad_margin_parameters() -> None:
    with pytest.raises(ValueError, match="scale"):
        margins.CosFace(scale=-1.0)
    with pytest.raises(ValueError, match="integer"):
        margins.LSoftmax(margin=1.5)
    with pytest.raises(ValueError, match="unknown margin"):
        margins.build_margin("nosuchface")


def test_arcface_monotonic_option_only_changes_large_angles() -> None:
    cos = torch.linspace(-0.999, 0.999, 101, dtype=torch.float64)
    plain = margins.ArcFace(margin=0.5).target_cosine(cos, 0)
    mono = margins.ArcFace(margin=0.5, monotonic=True).target_cosine(cos, 0)
    small_angle = cos > math.cos(math.pi - 0.5)
    assert torch.equal(plain[small_angle], mono[small_angle])
    assert torch.all(mono[1:] >= mono[:-1])  # increasing in cos, i.e. decreasing in theta
    assert not torch.all(plain[1:] >= plain[:-1])  # the plain curve turns back past pi - m


def test_sphereface_annealing_follows_the_head_step() -> None:
    margin = margins.SphereFace(margin=4, lambda_base=1000.0, lambda_min=5.0, gamma=0.5, power=1.0)
    assert margin.annealing_lambda(0) == 1000.0 and margin.annealing_lambda(10**6) == 5.0
    x, labels = make_batch(6, 15, seed=8)
    head = PartialFC(margin, DIM, 15)
    for step in range(3):
        loss = head(x, labels)
        ref_loss, _, _ = reference_loss_and_grads(margin, x, head.weight, labels, step=step)
        assert loss.item() == pytest.approx(ref_loss, rel=1e-5), step
    assert head.training_forwards == 3
    head.eval()
    head(x, labels)
    assert head.training_forwards == 3  # evaluation forwards do not advance the schedule


def test_eval_mode_does_not_shift_the_training_draws() -> None:
    x, labels = make_batch(6, 50, seed=7)
    heads = [PartialFC(margins.CosFace(scale=16.0), DIM, 50, sample_rate=0.2, seed=3) for _ in range(2)]
    heads[1].eval()
    heads[1](x, labels)
    heads[1].train()
    for head in heads:
        head(x, labels)
    assert torch.equal(heads[0].sampled_class_ids, heads[1].sampled_class_ids)


def test_row_blocks_follow_the_device_and_do_not_change_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cache-sized blocks on the CPU, large ones on an accelerator (and the meta device of dry runs); the block
    size changes how the rows are gathered, graded and updated, not the result (beyond fp32 rounding)."""
    from largefr.heads import partial_fc, row_grad
    from largefr.memory_plan import PlanInput, plan_memory

    assert row_grad.block_rows(torch.device("cpu")) == row_grad.BLOCK_ROWS == 2048
    assert row_grad.block_rows(torch.device("meta")) == row_grad.ACCELERATOR_BLOCK_ROWS == 32768
    planned = {dev: plan_memory(PlanInput(1000, 64, world_size=1, compute_device=dev)).terms["head: optimizer block buffers"]
               for dev in ("cpu", "cuda")}
    assert planned == {"cpu": 4 * 2048 * 64 * 4, "cuda": 4 * 32768 * 64 * 4}

    def train(block: int | None) -> torch.Tensor:
        if block is not None:
            for module in (partial_fc, row_grad, row_optim):
                monkeypatch.setattr(module, "block_rows", lambda device: block)
        head = PartialFC(margins.ArcFace(), DIM, 50, 0.5, seed=2)
        opt = head.optimizer("sgd", lr=0.1, momentum=0.9)
        for step in range(3):
            x, labels = make_batch(6, 50, seed=step)
            head(x, labels).backward()
            if step == 2:
                head.row_grad().materialize(head.weight.detach())  # the materialised form, in blocks too
            opt.step()
        return head.weight.detach().clone()

    # a block's G^T x is a GEMM whose kernel (hence summation order) BLAS picks by its row count: equal to rounding
    torch.testing.assert_close(train(None), train(3), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("margin", [margins.Softmax(), margins.ArcFace(16.0), margins.SubCenterArcFace(16.0, 0.5, 3),
                                    margins.CurricularFace(16.0, 0.5, interclass_filter=0.3)], ids=repr)
@pytest.mark.parametrize("rate,chunk", [(1.0, None), (0.5, None), (0.5, 4)])
def test_logit_tiles_do_not_change_the_step(
    margin: margins.Margin, rate: float, chunk: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The logits' elementwise passes run in row tiles (cache-sized on the CPU); every pass is row-wise, so
    one-row tiles give the same bits as one tile per chunk. An accelerator (and the meta device) uses one tile."""
    from largefr.heads import sharded_softmax

    assert sharded_softmax.row_tiles(10, 1_000_000, torch.device("cpu")) == [(a, a + 1) for a in range(10)]
    assert sharded_softmax.row_tiles(10, 1000, torch.device("cpu")) == [(0, 10)]
    assert sharded_softmax.row_tiles(1024, 10**6, torch.device("meta")) == [(0, 1024)]

    def step(tile_bytes: int) -> list[torch.Tensor]:
        monkeypatch.setattr(sharded_softmax, "CPU_TILE_BYTES", tile_bytes)
        head = PartialFC(margin, DIM, 40, rate, seed=3, chunk_rows=chunk)
        x, labels = make_batch(10, 40, seed=5)
        x.requires_grad_(True)
        loss = head(x, labels)
        loss.backward()
        return [loss.detach(), x.grad, head.row_grad().grad]  # type: ignore[union-attr]

    whole, one_row = step(1 << 30), step(1)
    for a, b in zip(whole, one_row):
        assert torch.equal(a, b)
