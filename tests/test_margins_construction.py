"""Margins built positionally (as the README writes them) equal the same margins built by keyword."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from largefr import PartialFC
from largefr.heads import margins
from tests.reference import reference_loss_and_grads

POSITIONAL_AND_KEYWORD = [
    (margins.NormFace(32.0), margins.NormFace(scale=32.0)),
    (margins.CosFace(64, 0.2), margins.CosFace(scale=64, margin=0.2)),
    (margins.ArcFace(64, 0.3), margins.ArcFace(scale=64, margin=0.3)),
    (margins.CombinedMargin(64, 1.0, 0.3, 0.2), margins.CombinedMargin(scale=64, m1=1.0, m2=0.3, m3=0.2)),
    (margins.LSoftmax(4), margins.LSoftmax(margin=4)),
    (margins.LSoftmax(2, 100.0, 3.0, 0.1, 2.0),
     margins.LSoftmax(margin=2, lambda_base=100.0, lambda_min=3.0, gamma=0.1, power=2.0)),
    (margins.SphereFace(4, 10.0, 1.0, 0.1, 1.0),
     margins.SphereFace(margin=4, lambda_base=10.0, lambda_min=1.0, gamma=0.1, power=1.0)),
]


@pytest.mark.parametrize("positional,keyword", POSITIONAL_AND_KEYWORD, ids=lambda m: type(m).__name__)
def test_positional_equals_keyword(positional: margins.Margin, keyword: margins.Margin) -> None:
    assert positional == keyword
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    losses = [PartialFC(m, 8, 5, seed=1)(x, labels) for m in (positional, keyword)]
    assert torch.equal(losses[0], losses[1])
    head = PartialFC(positional, 8, 5, seed=1)
    expected = reference_loss_and_grads(positional, x, head.weight, labels)[0]
    assert abs(losses[0].item() - expected) < 1e-4 * max(1.0, abs(expected))


def test_combined_margin_positional_loss_is_the_papers() -> None:
    """s (cos(m1 theta + m2) - m3) on the target: checked against the formula written out here."""
    m = margins.CombinedMargin(64, 1.0, 0.3, 0.2)
    cos = torch.tensor([0.3, -0.1, 0.9], dtype=torch.float64)
    expected = 64 * (torch.cos(torch.acos(cos) + 0.3) - 0.2)
    torch.testing.assert_close(m.feature_scale * m.target_cosine(cos, 0), expected)


def test_normalisations_are_fixed_per_class_not_arguments() -> None:
    expected = {margins.Softmax: (False, False), margins.NormFace: (True, True), margins.CosFace: (True, True),
                margins.ArcFace: (True, True), margins.CombinedMargin: (True, True),
                margins.LSoftmax: (False, False), margins.SphereFace: (False, True)}
    for cls, (features, weight) in expected.items():
        assert (cls.normalize_features, cls.normalize_weight) == (features, weight)
        names = {f.name for f in dataclasses.fields(cls)}
        assert not names & {"normalize_features", "normalize_weight"}, cls
        with pytest.raises(TypeError):
            cls(normalize_features=True)  # type: ignore[call-arg]


def test_flags_are_keyword_only_and_typed() -> None:
    with pytest.raises(TypeError, match="monotonic must be True or False, got 0.5"):
        margins.ArcFace(64, 0.5, monotonic=0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="monotonic must be True or False"):
        margins.CombinedMargin(64, 1.0, 0.3, 0.2, monotonic=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        margins.ArcFace(64, 0.5, True)  # type: ignore[misc]
    with pytest.raises(TypeError, match="scale must be a finite number"):
        margins.CosFace(True, 0.2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="margin must be a finite number"):
        margins.CosFace(64, "0.2")  # type: ignore[arg-type]
