"""Training on a GPU: fp32 steps equal the CPU's, fp16 + loss scaler (an overflow step skipped) and bf16;
a DCP checkpoint written on cuda, loaded on the CPU and back; ONNX export of a cuda-trained backbone;
the DALI ``mixed`` loader and DeepSpeed where their packages import.

The CPU sides run in rank processes that see no CUDA device (CUDA_VISIBLE_DEVICES=""), so
largefr.distributed picks gloo + cpu there exactly as on a machine without a GPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from cuda_support import CUDA_TESTS
from largefr.train.build import build_parts
from largefr.train.step import train_step
from multirank import run_ranks
from test_train_step import global_batches, tiny_config

pytestmark = CUDA_TESTS


@contextlib.contextmanager
def cpu_only_ranks() -> Iterator[None]:
    """Rank processes spawned inside see no CUDA device."""
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if previous is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous


def _no_tf32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _weights(parts: Any) -> list[torch.Tensor]:
    return [p.detach().cpu().clone() for p in parts.model.parameters()] + [parts.head.weight.detach().cpu().clone()]


def _train(ctx: Any, precision: str) -> dict[str, Any]:
    """Three steps of the tiny recipe (BatchNorm frozen) on this rank's device."""
    _no_tf32()
    parts = build_parts(tiny_config(precision=precision), ctx, steps_per_epoch=10)
    parts.ddp.eval()
    losses, skipped = [], []
    for images, labels in global_batches():
        result = train_step(parts, [(images.to(ctx.device), labels.to(ctx.device))])
        losses.append(float(result.loss))
        skipped.append(float(result.skipped))
    return {"device": str(ctx.device), "weights": _weights(parts), "losses": losses, "skipped": skipped}


def test_fp32_training_steps_on_cuda_equal_the_cpu_ones() -> None:
    on_gpu = run_ranks(_train, 1, "fp32")[0]
    with cpu_only_ranks():
        on_cpu = run_ranks(_train, 1, "fp32")[0]
    assert on_gpu["device"].startswith("cuda") and on_cpu["device"] == "cpu"
    assert on_gpu["losses"] == pytest.approx(on_cpu["losses"], rel=1e-4)
    for gpu, cpu in zip(on_gpu["weights"], on_cpu["weights"]):
        torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-5)


def _fp16_overflow_then_bf16(ctx: Any) -> dict[str, Any]:
    parts = build_parts(tiny_config(precision="fp16"), ctx, steps_per_epoch=10)
    scaler = parts.precision.scaler
    scaler.load_state_dict({"enabled": True, "scale": 2.0**100, "growth_tracker": 0})  # fp16 gradients overflow
    (x, y), *rest = [(a.to(ctx.device), b.to(ctx.device)) for a, b in global_batches()]
    before = _weights(parts)
    first = train_step(parts, [(x, y)])
    after_overflow, scale_after = _weights(parts), scaler.get_scale()
    scaler.load_state_dict({"enabled": True, "scale": 2.0**8, "growth_tracker": 0})
    normal = [train_step(parts, [batch]) for batch in [(x, y), *rest]]
    bf16 = build_parts(tiny_config(precision="bf16"), ctx, steps_per_epoch=10)
    bf16_start = _weights(bf16)
    bf16_losses = [float(train_step(bf16, [batch]).loss) for batch in [(x, y), *rest]]
    return {
        "skipped": [float(first.skipped)] + [float(r.skipped) for r in normal],
        "unchanged_after_overflow": all(torch.equal(a, b) for a, b in zip(before, after_overflow)),
        "changed_after_normal_steps": sum(not torch.equal(a, b) for a, b in zip(after_overflow, _weights(parts))),
        "scales": (scale_after, scaler.get_scale()),
        "fp16_losses": [float(r.loss) for r in normal],
        "bf16_losses": bf16_losses,
        "bf16_changed": sum(not torch.equal(a, b) for a, b in zip(bf16_start, _weights(bf16))),
    }


def test_fp16_with_the_loss_scaler_skips_an_overflow_step_and_bf16_trains() -> None:
    r = run_ranks(_fp16_overflow_then_bf16, 1)[0]
    assert r["skipped"] == [1.0, 0.0, 0.0, 0.0] and r["unchanged_after_overflow"]
    assert r["scales"] == (2.0**99, 2.0**8) and r["changed_after_normal_steps"] > 10
    assert all(0 < loss < 100 for loss in r["fp16_losses"] + r["bf16_losses"])
    assert r["bf16_changed"] > 10


class _LoaderPosition:
    """What saving and resuming need of a loader: its position, at this run's batch size."""

    def __init__(self, batch_size: int) -> None:
        self.state = {"epoch": 0, "step": 1, "position": batch_size, "skipped": 0, "world_size": 1,
                      "batch_size": batch_size, "seed": 7}

    def state_dict(self) -> dict[str, int]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = dict(state)


def _snapshot(parts: Any) -> dict[str, Any]:
    return {
        "device": str(parts.head.weight.device),
        "weights": _weights(parts),
        "momentum": parts.head_opt.state[parts.head.weight]["momentum_buffer"].cpu().clone(),
        "backbone_opt": [s["momentum_buffer"].cpu().clone() for s in parts.backbone_opt.state.values()],
        "lr": parts.backbone_opt.param_groups[0]["lr"],
    }


def _load_train_save(ctx: Any, load_from: str | None, output_dir: str | None) -> dict[str, Any]:
    """Fresh parts on this rank's device; load ``load_from`` if given, train one step, save into ``output_dir``."""
    from largefr.train.state import Progress, resume, save

    _no_tf32()
    cfg = dataclasses.replace(tiny_config(precision="fp32"), output_dir=output_dir or "unused")
    parts = build_parts(cfg, ctx, steps_per_epoch=10)
    position = _LoaderPosition(cfg.train.batch_size)
    loaded = None
    if load_from is not None:
        resume(parts, position, load_from)
        loaded = _snapshot(parts)
    images, labels = global_batches()[0]
    train_step(parts, [(images.to(ctx.device), labels.to(ctx.device))])
    saved = None if output_dir is None else str(save(parts, position, Progress(step=1)))
    return {"loaded": loaded, "trained": _snapshot(parts), "saved": saved}


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    for key in ("weights", "backbone_opt"):
        assert len(a[key]) == len(b[key]) > 10 and all(torch.equal(x, y) for x, y in zip(a[key], b[key])), key
    assert torch.equal(a["momentum"], b["momentum"]) and a["lr"] == b["lr"]


def test_dcp_checkpoint_written_on_cuda_loads_on_the_cpu_and_back(tmp_path: Path) -> None:
    on_gpu = run_ranks(_load_train_save, 1, None, str(tmp_path / "gpu"))[0]
    with cpu_only_ranks():
        on_cpu = run_ranks(_load_train_save, 1, on_gpu["saved"], str(tmp_path / "cpu"))[0]
    back = run_ranks(_load_train_save, 1, on_cpu["saved"], None)[0]
    assert on_gpu["trained"]["device"].startswith("cuda") and on_cpu["loaded"]["device"] == "cpu"
    assert back["loaded"]["device"].startswith("cuda")
    _assert_same(on_cpu["loaded"], on_gpu["trained"])
    _assert_same(back["loaded"], on_cpu["trained"])


def _train_and_export(ctx: Any, out: str) -> dict[str, Any]:
    from largefr.eval.export import export_onnx, onnx_max_abs_diff

    _no_tf32()
    parts = build_parts(tiny_config(precision="bf16"), ctx, steps_per_epoch=10)
    for images, labels in global_batches():
        train_step(parts, [(images.to(ctx.device), labels.to(ctx.device))])
    model = parts.model.eval()
    x = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        on_gpu = model(x.to(ctx.device)).cpu()
    path = export_onnx(model, out)  # moves the model to the CPU
    return {"device": str(ctx.device), "onnx_vs_torch_cpu": onnx_max_abs_diff(model, path), "on_gpu": on_gpu,
            "path": str(path)}


def test_onnx_export_of_a_cuda_trained_backbone_matches_onnxruntime(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    import onnxruntime as ort

    r = run_ranks(_train_and_export, 1, str(tmp_path / "model.onnx"))[0]
    assert r["device"].startswith("cuda") and r["onnx_vs_torch_cpu"] <= 1e-3
    x = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(r["path"], providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    torch.testing.assert_close(got, r["on_gpu"], rtol=1e-3, atol=1e-3)


def test_dali_mixed_decoding_gives_the_cpu_pipelines_batches(tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali", reason="nvidia.dali is not installed (DALI's mixed nvJPEG path needs it)")
    from largefr.data.loader_factory import build_loader
    from largefr.models.input import normalize_images
    from test_data_loader import decode_samples, label_of, make_dataset

    make_dataset(tmp_path)
    batches = {}
    for device in (torch.device("cpu"), torch.device("cuda", 0)):
        loader = build_loader(tmp_path, batch_size=8, seed=2, kind="dali", device=device, num_threads=1)
        batches[device.type] = []
        for images, labels, mirror in loader:
            assert images.dtype == torch.uint8 and images.device == device and labels.device == device
            assert mirror.device == device
            samples = decode_samples(images.cpu())
            assert labels.cpu().tolist() == [label_of(k) for k in samples]
            # the step's input on the device: the GPU's where + fused normalise, the CPU's numpy mirror copies
            batches[device.type].append((samples, mirror.cpu(), normalize_images(images, mirror).cpu()))
    assert [s for s, _, _ in batches["cuda"]] == [s for s, _, _ in batches["cpu"]]
    for (_, gpu_mirror, gpu), (_, cpu_mirror, cpu) in zip(batches["cuda"], batches["cpu"]):
        assert torch.equal(gpu_mirror, cpu_mirror)
        assert (gpu - cpu).abs().max() <= 8 / 127.5 + 1e-6  # nvJPEG and libjpeg-turbo may round differently


def _deepspeed_backbone_steps(ctx: Any) -> dict[str, Any]:
    import deepspeed

    from largefr.train.amp import Precision

    parts = build_parts(tiny_config(precision="bf16"), ctx, steps_per_epoch=10)
    # fp32 engine under torch autocast (DeepSpeed's own bf16 mode would cast the fp32 embedding layer's weights)
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1}}
    engine, *_ = deepspeed.initialize(model=parts.model, optimizer=torch.optim.SGD(parts.model.parameters(), lr=0.05),
                                      config=config)
    precision = Precision("bf16", ctx.device)
    losses = []
    for images, labels in global_batches():
        inputs = parts.inputs(images.to(ctx.device))
        with precision.autocast():
            loss = parts.head(engine(inputs).float(), labels.to(ctx.device))
        engine.backward(loss)
        engine.step()
        parts.head_opt.step()  # the class-sharded head stays outside the engine, with its own optimizer
        parts.head_opt.zero_grad()
        losses.append(float(loss))
    return {"losses": losses}


def test_deepspeed_zero1_backbone_with_the_head_outside_the_engine() -> None:
    pytest.importorskip("deepspeed", reason="deepspeed is not installed")
    losses = run_ranks(_deepspeed_backbone_steps, 1)[0]["losses"]
    assert len(losses) == 3 and all(0 < loss < 100 for loss in losses)
