"""`largefr train` end to end: config errors, the exported init, and tiny runs on 2 gloo ranks through
launch/single_node.sh (torchrun) and launch/multi_node.sh (two "nodes" on 127.0.0.1), which must agree."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from largefr.cli import main
from largefr.config import load_config
from largefr.distributed import free_port
from largefr.backbone_file import load_backbone_from_checkpoint, read_meta_json
from largefr.train.build import seeded_backbone
from largefr.train.checkpoint import completed_checkpoints
from test_train_resume import assert_identical, flat_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "synthetic_cpu.yaml"
IDENTITIES = 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from largefr.data.synth import SynthSpec
    from largefr.data.synth_dataset import write_synthetic_dataset

    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(out, SynthSpec(identities=IDENTITIES, per_identity=4, seed=5, holdout=4, pairs=12), workers=1, progress=False)
    return out


def tiny_sets(dataset: Path, output_dir: Path) -> list[str]:
    sets = [
        f"data.path={dataset}", "data.num_workers=1", f"output_dir={output_dir}",
        "model.kwargs={base_width: 4}", "head.embedding_size=16", "head.sample_rate=0.5",
        "train.batch_size=2", "train.grad_accum=2", "train.precision=bf16", "train.log_every=2",
        "train.eval_every=3", "train.eval_bins=[verification.bin]", "schedule.total_steps=6", "schedule.warmup_steps=1",
        "checkpoint.every_steps=2", "checkpoint.keep_last=2",
    ]
    return [arg for s in sets for arg in ("--set", s)]


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["train", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.batch_sise=4", "config field train.batch_sise: unknown field; did you mean 'batch_size'?"),
        ("train.batch_size=four", "config field train.batch_size: got 'four' (str), expected int"),
        ("optim.head.lr=-1", "config field optim.head.lr: got -1.0, expected a finite value > 0"),
        ("train.precision=fp8", "config field train.precision: got 'fp8' (str), expected one of"),
        ("data.path=/nonexistent/set", "config field data.path: /nonexistent/set/manifest.json not found"),
        ("head.num_classes=5", f"config field head.num_classes: got 5, but the dataset manifest says {IDENTITIES}"),
        ("train.eval_bins=[missing.bin]", "config field train.eval_bins[0]: got 'missing.bin'"),
        ("data.image_size=96", "config field data.image_size: got 96, but the images of"),
    ],
)
def test_config_errors_name_the_field(capsys, dataset, tmp_path, override, message):
    code, _, err = cli(capsys, CONFIG, "--set", f"data.path={dataset}", "--set", f"output_dir={tmp_path}",
                       "--set", override)
    assert code == 2 and message in err, err
    assert not (tmp_path / "checkpoints").exists()


def test_print_config_applies_overrides(capsys):
    code, out, _ = cli(capsys, CONFIG, "--print-config", "--set", "train.batch_size=7", "--set", "head.margin=cosface")
    loaded = yaml.safe_load(out)
    assert code == 0 and loaded["train"]["batch_size"] == 7 and loaded["head"]["margin"] == "cosface"
    assert loaded["model"]["name"] == "iresnet18"  # from the recipe


def test_help_config_lists_fields_and_print_config_carries_the_help(capsys):
    code, out, _ = cli(capsys, "--help-config")
    assert code == 0 and "head.chunk_rows: int | None = null\n" in out and "data.prefetch: int = 2\n" in out
    code, out, _ = cli(capsys, CONFIG, "--print-config")
    assert code == 0 and "  sample_rate: 0.5  # Partial FC: fraction of each rank's classes" in out
    code, _, err = cli(capsys)
    assert code == 2 and "a recipe YAML is needed" in err


def test_loader_options_come_from_the_data_section(dataset):
    from largefr.distributed import DistContext
    from largefr.train.build import build_train_loader, resolve_dataset

    cfg, manifest = resolve_dataset(load_config(CONFIG, [f"data.path={dataset}", "data.num_workers=0",
                                                         "data.prefetch=3", "data.random_flip=false"]))
    loader = build_train_loader(cfg, DistContext(0, 1, 0, "gloo", torch.device("cpu"), None), manifest)  # type: ignore[arg-type]
    assert (loader.config.num_threads, loader.config.prefetch, loader.config.flip) == (0, 3, False)


def test_export_init_is_the_training_init(capsys, tmp_path):
    sets = ["model.kwargs={base_width: 4}", "head.embedding_size=16"]
    code, out, _ = cli(capsys, CONFIG, "--export-init", tmp_path / "init", *[a for s in sets for a in ("--set", s)])
    assert code == 0 and "initial backbone written" in out
    exported = load_backbone_from_checkpoint(tmp_path / "init")
    reference = seeded_backbone(load_config(CONFIG, sets))
    torch.testing.assert_close(exported.state_dict(), reference.state_dict(), rtol=0, atol=0)


def run_script(script: str, args: list[str], **env: str) -> subprocess.Popen[str]:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])  # this venv's python
    full_env = {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **env}
    return subprocess.Popen(["bash", str(REPO / "launch" / script), str(CONFIG), *args], cwd=REPO, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"launcher timed out:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-6000:]
    return out


@pytest.mark.slow
def test_two_rank_cli_run_single_node_and_two_nodes_agree(dataset, tmp_path):
    single = tmp_path / "single"
    out = finish(run_script("single_node.sh", tiny_sets(dataset, single), NPROC_PER_NODE="2"))
    assert "resolved config (2 ranks, backend gloo" in out and "step 6 | loss" in out
    resolved = yaml.safe_load((single / "config.yaml").read_text())
    assert resolved["head"]["num_classes"] == IDENTITIES  # read from the manifest
    records = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert [r["step"] for r in records if "val/verification_acc" in r] == [3, 6]
    assert all(0.0 <= r["val/verification_acc"] <= 1.0 for r in records if "val/verification_acc" in r)
    kept = completed_checkpoints(single / "checkpoints")
    assert [step for step, _ in kept] == [4, 6]  # keep_last=2
    final = kept[-1][1]
    assert read_meta_json(final)["world_size"] == 2 and (final / "config.yaml").is_file()
    load_backbone_from_checkpoint(final)  # what `largefr eval` reads

    nodes = tmp_path / "nodes"
    env = {"NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [run_script("multi_node.sh", tiny_sets(dataset, nodes), NODE_RANK=str(r), **env) for r in (0, 1)]
    outputs = [finish(p) for p in procs]
    assert "resolved config (2 ranks" in outputs[0]
    other = completed_checkpoints(nodes / "checkpoints")[-1][1]
    assert_identical(flat_checkpoint(final, tmp_path), flat_checkpoint(other, tmp_path / "nodes"))


def test_launch_scripts_parse():
    for script in ("single_node.sh", "multi_node.sh", "slurm.sbatch", "demo.sh"):
        result = subprocess.run(["bash", "-n", str(REPO / "launch" / script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"
