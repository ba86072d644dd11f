"""A checkpoint moves between device types: the accelerator RNG state is saved only where there is one."""
from __future__ import annotations

import pytest
import torch

import largefr.train.checkpoint as checkpoint
from multirank import run_ranks


def _save_then_load_with_a_device_rng(ctx, root: str) -> dict:
    model = torch.nn.Linear(3, 2)
    path = checkpoint.save_checkpoint(root, 1, {"backbone": model}, ctx)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    torch.nn.init.zeros_(model.weight)
    plain = checkpoint._rng_state
    # as on a GPU rank: the RNG state to restore has a device entry this CPU-written checkpoint lacks
    checkpoint._rng_state = lambda c: {**plain(c), "device": torch.zeros(8, dtype=torch.uint8)}
    try:
        checkpoint.load_checkpoint(path, {"backbone": model}, ctx)
    finally:
        checkpoint._rng_state = plain
    return {"restored": all(torch.equal(saved[k], v) for k, v in model.state_dict().items())}


@pytest.mark.slow
def test_a_cpu_checkpoint_resumes_where_the_rng_state_has_a_device_entry(tmp_path):
    assert run_ranks(_save_then_load_with_a_device_rng, 1, str(tmp_path))[0]["restored"]
