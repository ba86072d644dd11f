"""Evaluation: verification .bin sets (10-fold accuracy, TAR@FAR), IJB-style 1:1 and 1:N, export.

``largefr eval`` lives in :mod:`largefr.eval.cli`, ``largefr export`` in :mod:`largefr.eval.export`.
"""
from largefr.eval.bin_io import BinFormatError, VerificationBin, load_bin, loads_bin, write_bin
from largefr.backbone_file import (
    CheckpointMeta,
    load_backbone_from_checkpoint,
    read_checkpoint_meta,
    save_backbone_checkpoint,
)
from largefr.eval.embed import decode_image, embed_images, encode_image
from largefr.eval.ijb import (
    identification,
    ijb_identification,
    ijb_verification,
    read_template_media,
    read_template_pairs,
    read_template_subjects,
    template_features,
)
from largefr.eval.verification import tar_at_far, verify, verify_interleaved

__all__ = [
    "BinFormatError",
    "CheckpointMeta",
    "VerificationBin",
    "decode_image",
    "embed_images",
    "encode_image",
    "identification",
    "ijb_identification",
    "ijb_verification",
    "load_backbone_from_checkpoint",
    "load_bin",
    "loads_bin",
    "read_checkpoint_meta",
    "read_template_media",
    "read_template_pairs",
    "read_template_subjects",
    "save_backbone_checkpoint",
    "tar_at_far",
    "template_features",
    "verify",
    "verify_interleaved",
    "write_bin",
]
