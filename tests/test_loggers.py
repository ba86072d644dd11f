import io
import json
import sys
import time

import pytest
import torch

from largefr.config import LoggingConfig, WandbConfig
from largefr.train.loggers import (
    ConsoleLogger,
    JsonlLogger,
    MultiLogger,
    NullLogger,
    WandbLogger,
    build_loggers,
)


def test_console_logger_formats_one_line_per_call():
    stream = io.StringIO()
    logger = ConsoleLogger(stream)
    logger.log(120, {"loss": torch.tensor(10.23456789), "lr": 0.0998, "samples": 2048})
    logger.log(121, {})
    assert stream.getvalue().splitlines() == ["step 120 | loss 10.235 | lr 0.0998 | samples 2048", "step 121"]


def test_jsonl_logger_writes_valid_json_lines(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    with JsonlLogger(path) as logger:
        logger.log(1, {"loss": 2.5, "acc": torch.tensor([0.75])})
        logger.log(2, {"loss": float("nan"), "grad_norm": float("inf")})
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["loss"] == 2.5 and records[0]["acc"] == 0.75
    assert records[1]["loss"] == "nan" and records[1]["grad_norm"] == "inf"
    assert abs(records[0]["time"] - time.time()) < 60
    with pytest.raises(RuntimeError, match="is closed"):
        logger.log(3, {"loss": 1.0})


@pytest.mark.parametrize(
    "step,metrics,error,pattern",
    [
        (-1, {}, ValueError, "step must be an int >= 0, got -1"),
        (1.5, {}, ValueError, "step must be an int >= 0, got 1.5"),
        (1, {"loss": "low"}, TypeError, "metric 'loss'='low': expected a str name and an int, float or 1-element"),
        (1, {"loss": torch.ones(2)}, TypeError, "metric 'loss'="),
        (1, {"flag": True}, TypeError, "metric 'flag'=True"),
    ],
)
def test_bad_metrics_are_clear_errors(step, metrics, error, pattern):
    with pytest.raises(error, match=pattern):
        ConsoleLogger(io.StringIO()).log(step, metrics)


def test_build_loggers_rank0_and_others(tmp_path, monkeypatch):
    cfg = LoggingConfig(console=True, jsonl=True, wandb=WandbConfig(enabled=True))
    monkeypatch.setitem(sys.modules, "wandb", None)  # any attempt to import wandb would now fail
    assert isinstance(build_loggers(cfg, tmp_path, rank=1), NullLogger)
    logger = build_loggers(LoggingConfig(console=False, jsonl=True), tmp_path, rank=0)
    assert isinstance(logger, MultiLogger) and [type(x) for x in logger.loggers] == [JsonlLogger]
    logger.log(5, {"loss": 1.0})
    logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 1.0
    with pytest.raises(ImportError):
        build_loggers(cfg, tmp_path, rank=0)


def test_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    logger = WandbLogger("largefr-test", tmp_path / "run", run_config={"train": {"batch_size": 2}})
    logger.log(1, {"loss": 3.0})
    logger.log(2, {"loss": torch.tensor(2.0)})
    logger.close()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    with pytest.raises(RuntimeError, match="closed"):
        logger.log(3, {"loss": 1.0})


def test_wandb_rejects_unknown_mode(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "cloudy")
    with pytest.raises(ValueError, match="wandb mode must be 'offline', 'online' or 'disabled', got 'cloudy'"):
        WandbLogger("p", tmp_path)
