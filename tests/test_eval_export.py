"""`largefr export onnx`: backbone only, dynamic batch, onnxruntime output equal to PyTorch's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from largefr.cli import main
from largefr.backbone_file import CheckpointMeta, load_backbone_from_checkpoint, save_backbone_checkpoint
from backbones import calibrated_backbone, one_torch_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.filterwarnings("ignore::FutureWarning")  # raised inside torch.export
def test_onnx_export_matches_pytorch_with_dynamic_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx
    import onnxruntime as ort

    meta = CheckpointMeta("iresnet18", 32, 112, {"base_width": 8})
    ckpt = save_backbone_checkpoint(tmp_path / "ckpt", calibrated_backbone("iresnet18", 32, base_width=8), meta)
    out = tmp_path / "model.onnx"
    assert main(["export", "onnx", "--checkpoint", str(ckpt), "--out", str(out)]) == 0  # traced at batch 2
    assert "max abs diff" in capsys.readouterr().out

    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == ["embedding"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch, not a fixed size
    model = load_backbone_from_checkpoint(ckpt, "cpu")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (3, 1):
        x = torch.randn(batch, 3, 112, 112, generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            expected = model(x).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        diff = float(np.abs(got - expected).max())
        with capsys.disabled():
            scale = np.abs(expected).max()
            print(f"\nONNX vs PyTorch, batch {batch}: max abs diff {diff:.3e} (|output| max {scale:.2f})")
        assert got.shape == (batch, 32)
        assert np.abs(expected).max() > 0.5  # a meaningful comparison, not two near-zero outputs
        assert diff < 1e-4


def test_export_bad_checkpoint_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "onnx", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "checkpoint meta not found" in capsys.readouterr().err
