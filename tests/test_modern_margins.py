"""Modern margins on one process: loss, embedding and W-row gradients and EMA state equal the float64
reference over several steps (sampled or not, chunked or not); state round trips; registry and bad input."""
from __future__ import annotations

import math

import pytest
import torch

from largefr import PartialFC
from largefr.heads import margins as M
from largefr.heads.sampling import init_weight_rows
from reference import MODERN_MARGINS, initial_reference_state, reference_loss_and_grads

NUM_CLASSES, DIM, BATCH, SEED, STEPS = 23, 16, 10, 7, 3
CASES = [(1.0, None), (0.5, None), (0.5, 4), (0.0, 4)]


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, DIM, generator=gen), torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 2e-4) -> None:
    err = (actual.double() - expected).abs().max().item()
    assert err <= rel * expected.abs().max().item() + 1e-7, f"max abs error {err:.3e}"


def sub_center_rows(class_ids: torch.Tensor, sub_centers: int) -> torch.Tensor:
    return (class_ids[:, None] * sub_centers + torch.arange(sub_centers)).reshape(-1)


@pytest.mark.parametrize("rate,chunk", CASES)
@pytest.mark.parametrize("margin", MODERN_MARGINS, ids=lambda m: repr(m)[:40])
def test_steps_match_reference(margin: M.Margin, rate: float, chunk: int | None) -> None:
    x0, labels = batch()
    sub = margin.num_sub_centers
    full_w = init_weight_rows(0, NUM_CLASSES * sub, DIM, SEED)
    head = PartialFC(margin, DIM, NUM_CLASSES, rate, seed=SEED, chunk_rows=chunk)
    assert head.weight.shape == (NUM_CLASSES * sub, DIM)
    state = initial_reference_state(margin)
    for step in range(STEPS):
        x = (x0 * (1 + 0.2 * step)).requires_grad_(True)
        loss = head(x, labels)
        loss.backward()
        ids = head.sampled_class_ids
        ref_loss, ref_x, ref_w = reference_loss_and_grads(
            margin, x, full_w[sub_center_rows(ids, sub)], torch.searchsorted(ids, labels), step, state, SEED
        )
        assert loss.item() == pytest.approx(ref_loss, rel=1e-5), step
        _close(x.grad, ref_x)
        _close(head.row_grad().grad, ref_w)
        head.zero_grad()
        for name, value in state.items():
            assert head.margin_state[name].item() == pytest.approx(value, rel=1e-6, abs=1e-7), name


def test_state_follows_training_not_eval_and_round_trips_through_state_dict() -> None:
    x, labels = batch(3)
    head = PartialFC(M.AdaFace(16.0), DIM, NUM_CLASSES, 0.5, seed=SEED)
    head(x, labels)
    trained = {k: v.clone() for k, v in head.margin_state.items()}
    assert trained["batch_mean"].item() != 20.0
    head.eval()
    head(x, labels)
    assert all(torch.equal(trained[k], v) for k, v in head.margin_state.items())  # eval reads, never updates
    head.train()
    fresh = PartialFC(M.AdaFace(16.0), DIM, NUM_CLASSES, 0.5, seed=SEED)
    fresh.load_state_dict(head.state_dict())
    assert {k: v.item() for k, v in fresh.margin_state.items()} == {k: v.item() for k, v in trained.items()}
    assert torch.equal(head(x, labels), fresh(x, labels))
    with pytest.raises(ValueError, match=r"margin state \['t'\] does not match AdaFace"):
        fresh.load_margin_state({"t": torch.tensor(0.5)})


def test_curricular_t_is_the_ema_of_the_mean_target_cosine() -> None:
    x, labels = batch(4)
    head = PartialFC(M.CurricularFace(16.0), DIM, NUM_CLASSES, seed=SEED)
    w = head.weight.detach()
    cos = torch.nn.functional.cosine_similarity(x, w[labels], dim=1)
    head(x, labels)
    head(x, labels)
    expected = 0.01 * cos.mean() + 0.99 * (0.01 * cos.mean())
    assert head.margin_state["t"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_elastic_draws_depend_on_seed_and_step_only() -> None:
    from largefr.heads.modern_margins import step_normal

    a = step_normal(3, 5, 12, torch.device("cpu"))
    assert torch.equal(a, step_normal(3, 5, 12, torch.device("cpu")))
    assert not torch.equal(a, step_normal(3, 6, 12, torch.device("cpu")))
    assert not torch.equal(a, step_normal(4, 5, 12, torch.device("cpu")))
    assert abs(a.mean().item()) < 1.5 and 0.3 < a.std().item() < 2.0


def test_magface_regularizer_is_lambda_g_times_the_mean_of_g() -> None:
    margin = M.MagFace()
    a = torch.tensor([5.0, 10.0, 50.0, 200.0])
    clipped = torch.tensor([10.0, 10.0, 50.0, 110.0])
    torch.testing.assert_close(margin.sample_regularizer(a), 35.0 * (clipped / 110.0**2 + 1 / clipped))
    torch.testing.assert_close(margin.adaptive_margin(torch.tensor([10.0, 110.0])), torch.tensor([0.45, 0.8]))


def test_registry_names_and_paper_defaults() -> None:
    expected = {
        "curricularface": dict(scale=64.0, margin=0.5, momentum=0.01),
        "adaface": dict(scale=64.0, margin=0.4, h=0.333, momentum=0.01),
        "magface": dict(scale=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0),
        "subcenter_arcface": dict(scale=64.0, margin=0.5, sub_centers=3),
        "elastic_arcface": dict(scale=64.0, margin=0.5, sigma=0.05),
        "elastic_cosface": dict(scale=64.0, margin=0.35, sigma=0.05),
    }
    for name, params in expected.items():
        margin = M.build_margin(name)
        assert {k: getattr(margin, k) for k in params} == params, name
        assert M.build_margin(name, **params) == margin
    assert M.build_margin("arcface", interclass_filter=0.4).interclass_filter == 0.4


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: M.CurricularFace(64, 0.5, 0.0), ValueError, r"momentum must be in \(0, 1\]"),
        (lambda: M.SubCenterArcFace(64, 0.5, 0), ValueError, "sub_centers must be an integer >= 1, got 0"),
        (lambda: M.ArcFace(64, 0.5, interclass_filter=1.5), ValueError, "interclass_filter must be a cosine"),
        (lambda: M.MagFace(64, 110.0, 10.0), ValueError, "need 0 < l_a < u_a"),
        (lambda: M.ElasticArcFace(64, 0.5, -0.1), ValueError, "sigma must be >= 0"),
        (lambda: M.AdaFace(64, "0.4"), TypeError, "margin must be a finite number"),
        (lambda: M.CurricularFace(64, 0.5, 0.01, monotonic=1), TypeError, "monotonic must be True or False"),
    ],
)
def test_bad_parameters_raise(build, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        build()


def test_sub_centre_class_logit_is_the_max_over_its_sub_centres() -> None:
    """With the margin off, the loss is the softmax CE of s * max_k cos over the K sub-centres."""
    x, labels = batch(5)
    head = PartialFC(M.SubCenterArcFace(8.0, 0.0, 2), DIM, NUM_CLASSES, seed=SEED)
    w = torch.nn.functional.normalize(head.weight.detach().double(), dim=1).view(NUM_CLASSES, 2, DIM)
    cos = torch.einsum("nd,ckd->nck", torch.nn.functional.normalize(x.double(), dim=1), w).amax(dim=2)
    expected = torch.nn.functional.cross_entropy(8.0 * cos, labels)
    assert head(x, labels).item() == pytest.approx(expected.item(), rel=1e-5)
    assert math.isfinite(expected.item())


def test_recipes_build_the_papers_margins() -> None:
    from pathlib import Path

    from largefr.config import load_config

    configs = Path(__file__).resolve().parent.parent / "configs"
    expected = {
        "ms1mv3_r50_curricularface.yaml": M.CurricularFace(64.0, 0.5, 0.01),
        "ms1mv3_r50_adaface.yaml": M.AdaFace(64.0, 0.4, 0.333, 0.01),
        "ms1mv3_r50_magface.yaml": M.MagFace(64.0, 10.0, 110.0, 0.45, 0.8, 35.0),
        "ms1mv3_r50_subcenter_arcface.yaml": M.SubCenterArcFace(64.0, 0.5, 3),
        "ms1mv3_r50_elastic_arcface.yaml": M.ElasticArcFace(64.0, 0.5, 0.05),
        "ms1mv3_r50_elastic_cosface.yaml": M.ElasticCosFace(64.0, 0.35, 0.05),
    }
    for name, margin in expected.items():
        cfg = load_config(configs / name)
        assert M.build_margin(cfg.head.margin, **cfg.head.margin_params) == margin, name
        assert cfg.head.num_classes == 93431, name


def test_bench_margin_parameter_parsing_and_cost_statements() -> None:
    import argparse

    from largefr.heads.margins import parse_margin_param as _margin_param

    assert _margin_param("scale=64") == ("scale", 64.0) and _margin_param("sub_centers=3") == ("sub_centers", 3)
    with pytest.raises(argparse.ArgumentTypeError, match="expected K=V"):
        _margin_param("scale")
    assert M.ArcFace().extra_cost() == "" and M.ElasticArcFace().extra_cost() == ""
    assert "extra passes" in M.CurricularFace().extra_cost() and "all-reduce" in M.CurricularFace().extra_cost()
    assert "3x wider" in M.SubCenterArcFace().extra_cost()
    assert "extra passes" in M.ArcFace(interclass_filter=0.4).extra_cost()


@pytest.mark.parametrize("margin", [M.CurricularFace(16.0, interclass_filter=0.3), M.SubCenterArcFace(16.0),
                                    M.AdaFace(16.0), M.MagFace(16.0, 1.0, 6.0)], ids=lambda m: type(m).__name__)
def test_bf16_autocast_close_to_fp32(margin: M.Margin) -> None:
    x, labels = batch(6)
    results = []
    for autocast in (False, True):
        head = PartialFC(margin, DIM, NUM_CLASSES, sample_rate=0.5, seed=1)
        xg = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = head(xg, labels)
        assert loss.dtype == torch.float32
        loss.backward()
        results.append((loss.item(), xg.grad.clone(), head.row_grad().grad.clone()))
    (l32, gx32, gw32), (l16, gx16, gw16) = results
    assert l16 == pytest.approx(l32, rel=2e-2)
    assert (gx16 - gx32).norm() / gx32.norm() < 5e-2
    assert (gw16 - gw32).norm() / gw32.norm() < 5e-2
