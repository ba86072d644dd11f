"""The exported backbone format (largefr.backbone_file): one writer, one reader, wrapper prefixes removed."""
import pytest
import torch
from torch import nn

from largefr.backbone_file import (
    CheckpointMeta,
    load_backbone_from_checkpoint,
    read_checkpoint_meta,
    read_meta_json,
    write_backbone,
)
from largefr.models import build_backbone

META = CheckpointMeta("iresnet18", 8, 112, {"base_width": 4})


def tiny_backbone() -> nn.Module:
    torch.manual_seed(0)
    return build_backbone("iresnet18", 8, base_width=4)


def test_ddp_prefixed_state_is_written_plain_and_loads(tmp_path):
    model = tiny_backbone()
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}
    write_backbone(tmp_path, wrapped, META, extra_fields={"step": 3})
    saved = torch.load(tmp_path / "backbone.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in saved)
    assert read_meta_json(tmp_path) == {**META.json_fields(), "step": 3}
    assert read_checkpoint_meta(tmp_path) == META
    torch.testing.assert_close(load_backbone_from_checkpoint(tmp_path).state_dict(), model.state_dict(), rtol=0, atol=0)


def test_extra_fields_cannot_replace_the_backbone_fields(tmp_path):
    with pytest.raises(ValueError, match=r"\['embedding_size'\] would overwrite"):
        write_backbone(tmp_path, tiny_backbone().state_dict(), META, extra_fields={"embedding_size": 9})


def test_meta_json_that_is_not_an_object_is_refused(tmp_path):
    (tmp_path / "meta.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        read_checkpoint_meta(tmp_path)
