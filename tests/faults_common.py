"""A tiny synthetic run shared by the fault tests (8 identities x 4 images, iresnet18 of width 4, D 16)."""
from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "synthetic_cpu.yaml"


def write_dataset(out: Path, identities: int = 8, per_identity: int = 4) -> Path:
    from largefr.data.synth import SynthSpec
    from largefr.data.synth_dataset import write_synthetic_dataset

    write_synthetic_dataset(out, SynthSpec(identities=identities, per_identity=per_identity, seed=3), workers=1,
                            progress=False)
    return out


def tiny_run(dataset: Path, output_dir: Path, *extra: str, total_steps: int = 12) -> list[str]:
    """``--set`` overrides of a run of ``total_steps`` optimizer steps of 2 images per rank."""
    return [
        f"data.path={dataset}", "data.num_workers=0", f"output_dir={output_dir}",
        "model.kwargs={base_width: 4}", "head.embedding_size=16", "head.sample_rate=1.0",
        "train.batch_size=2", "train.precision=fp32", "train.log_every=1", "train.eval_bins=[]",
        "schedule.warmup_steps=2", f"schedule.total_steps={total_steps}", "checkpoint.every_steps=2",
        "checkpoint.keep_last=50", "logging.console=false", *extra,
    ]


def metrics(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
