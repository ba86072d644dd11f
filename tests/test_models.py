import copy

import pytest
import torch

from largefr.models import build_backbone, list_backbones

IRESNETS = ["iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200"]


def _params(name: str, emb: int) -> int:
    with torch.device("meta"):
        model = build_backbone(name, emb)
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_all_backbones():
    assert list_backbones() == sorted(IRESNETS + ["mobilefacenet"])


@pytest.mark.parametrize(
    "name,emb,expected_m",
    [
        ("iresnet50", 512, 43.59),  # insightface arcface_torch r50
        ("iresnet100", 512, 65.16),  # insightface arcface_torch r100
        ("mobilefacenet", 128, 1.00),  # Chen et al. 2018: 0.99M
        ("mobilefacenet", 512, 1.20),
    ],
)
def test_parameter_counts_match_known_figures(name, emb, expected_m):
    assert _params(name, emb) / 1e6 == pytest.approx(expected_m, abs=0.01)


def test_deeper_iresnets_have_more_parameters():
    counts = [_params(n, 512) for n in IRESNETS]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)


@pytest.mark.parametrize("name", IRESNETS)
def test_iresnet_output_shape(name):
    torch.manual_seed(0)
    model = build_backbone(name, 64, base_width=4)
    out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 64) and torch.isfinite(out).all()


def test_mobilefacenet_output_shape_train_and_eval():
    model = build_backbone("mobilefacenet", 128, width=16)
    x = torch.randn(2, 3, 112, 112)
    assert model(x).shape == (2, 128)
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 128)


def _step(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = model(x)
    (out.square().sum() + out.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("name,kwargs", [("iresnet18", {"base_width": 8}), ("mobilefacenet", {"width": 16})])
def test_grad_checkpoint_gives_identical_outputs_grads_and_bn_stats(name, kwargs):
    torch.manual_seed(0)
    plain = build_backbone(name, 32, **kwargs)
    ckpt = copy.deepcopy(plain)
    ckpt.grad_checkpoint = True
    x = torch.randn(2, 3, 112, 112)
    out_a, grads_a = _step(plain, x)
    out_b, grads_b = _step(ckpt, x)
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for key in grads_a:
        torch.testing.assert_close(grads_b[key], grads_a[key], rtol=0, atol=0, msg=key)
    # the recomputation in backward must not update BatchNorm running statistics a second time
    for (key, a), (_, b) in zip(plain.named_buffers(), ckpt.named_buffers()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=key)


def test_grad_checkpoint_kwarg_is_passed_through():
    assert build_backbone("iresnet18", 8, base_width=4, grad_checkpoint=True).grad_checkpoint is True
    assert build_backbone("mobilefacenet", 8, width=8, grad_checkpoint=True).grad_checkpoint is True


@pytest.mark.parametrize("name,kwargs", [("iresnet18", {"base_width": 8}), ("mobilefacenet", {"width": 16})])
def test_forward_and_backward_under_bf16_autocast(name, kwargs):
    model = build_backbone(name, 32, grad_checkpoint=True, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 112, 112))
    out.sum().backward()
    assert out.dtype == torch.float32  # the embedding layer runs in fp32, as in insightface
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_unknown_backbone_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet50'.*iresnet100.*mobilefacenet"):
        build_backbone("resnet50")


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="embedding_size must be a positive int, got 0"):
        build_backbone("iresnet18", 0)
    with pytest.raises(TypeError, match="bad arguments for backbone 'iresnet18'.*no_such_kwarg"):
        build_backbone("iresnet18", 8, no_such_kwarg=1)
    with pytest.raises(ValueError, match="dropout must be in"):
        build_backbone("iresnet18", 8, dropout=1.5)


def test_wrong_input_size_is_a_clear_error():
    model = build_backbone("iresnet18", 8, base_width=4)
    with pytest.raises(ValueError, match=r"expects input \[N, 3, 112, 112\], got \[2, 3, 96, 96\]"):
        model(torch.randn(2, 3, 96, 96))
