from pathlib import Path

import pytest
import yaml

from largefr.config import (
    Config,
    ConfigError,
    OptimizerConfig,
    ScheduleConfig,
    config_from_dict,
    load_config,
    resolve_dataset_sizes,
)
from largefr.config_schema import parse_scalar

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = sorted(p.name for p in CONFIGS.glob("*.yaml"))


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_recipe_is_present_and_loads():
    assert {"base.yaml", "ms1mv3_r50.yaml", "glint360k_r100.yaml", "webface42m_r100_pfc02.yaml",
            "synthetic_cpu.yaml"} <= set(RECIPES)
    for name in RECIPES:
        cfg = load_config(CONFIGS / name)
        assert isinstance(cfg, Config)
        assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg  # to_yaml round-trips


def test_recipe_facts():
    ms1m = load_config(CONFIGS / "ms1mv3_r50.yaml")
    assert (ms1m.model.name, ms1m.head.num_classes, ms1m.data.num_images) == ("iresnet50", 93431, 5179510)
    assert (ms1m.head.margin, ms1m.head.margin_params) == ("arcface", {"scale": 64.0, "margin": 0.5})
    assert (ms1m.optim.backbone.lr, ms1m.optim.backbone.momentum, ms1m.optim.backbone.weight_decay) == (0.1, 0.9, 5e-4)
    assert (ms1m.train.epochs, ms1m.schedule.decay, ms1m.schedule.power) == (20, "poly", 2.0)
    assert ms1m.schedule.warmup_steps is None and ms1m.schedule.warmup_epochs is None
    assert (ms1m.train.precision, ms1m.head.sample_rate, ms1m.head.embedding_size) == ("fp16", 1.0, 512)

    glint = load_config(CONFIGS / "glint360k_r100.yaml")
    assert (glint.model.name, glint.head.num_classes, glint.head.margin) == ("iresnet100", 360232, "cosface")
    assert glint.head.margin_params == {"scale": 64.0, "margin": 0.4}  # replaced whole, not merged
    assert glint.optim.backbone.weight_decay == glint.optim.head.weight_decay == 1e-4
    assert glint.optim.backbone.lr == 0.1 and glint.optim.backbone.momentum == 0.9  # merged from base

    wf = load_config(CONFIGS / "webface42m_r100_pfc02.yaml")
    assert (wf.head.num_classes, wf.head.sample_rate, wf.model.name) == (2059906, 0.2, "iresnet100")
    assert (wf.optim.backbone.lr, wf.train.epochs, wf.optim.backbone.weight_decay) == (0.1, 20, 5e-4)

    demo = load_config(CONFIGS / "synthetic_cpu.yaml")
    assert demo.head.num_classes is None and demo.train.precision in ("bf16", "fp32")
    assert demo.train.batch_size <= 32 and demo.train.eval_bins == []


def test_set_overrides_are_parsed_as_yaml_then_checked():
    cfg = load_config(
        CONFIGS / "ms1mv3_r50.yaml",
        [
            "train.batch_size=64",
            "optim.backbone.lr=1e-3",  # YAML 1.1 would read this as a string
            "train.clip_grad_norm=null",
            "train.eval_bins=[lfw.bin]",
            "head.margin_params.margin=0.45",  # one key inside a free-form mapping
            "optim.backbone.name=adamw",
            "model.kwargs.base_width=32",
            "optim.head.lr=1",  # an int is accepted for a float field
        ],
    )
    assert cfg.train.batch_size == 64 and cfg.optim.backbone.lr == 1e-3
    assert cfg.train.clip_grad_norm is None and cfg.train.eval_bins == ["lfw.bin"]
    assert cfg.head.margin_params == {"scale": 64.0, "margin": 0.45}
    assert cfg.optim.backbone.name == "adamw" and cfg.model.kwargs == {"base_width": 32}
    assert cfg.optim.head.lr == 1.0 and isinstance(cfg.optim.head.lr, float)


def test_parse_scalar():
    assert parse_scalar("1e-3") == 1e-3 and parse_scalar("-2E4") == -2e4 and parse_scalar("3") == 3
    assert parse_scalar("true") is True and parse_scalar("null") is None and parse_scalar("abc") == "abc"


@pytest.mark.parametrize(
    "override,pattern",
    [
        ("train.batch_size=abc", r"train\.batch_size: got 'abc' \(str\), expected int"),
        ("train.batch_size=1.5", r"train\.batch_size: got 1\.5 \(float\), expected int"),
        ("train.batch_size=true", r"train\.batch_size: got True \(bool\), expected int"),
        ("train.batch_size=0", r"train\.batch_size: got 0, expected a finite value > 0"),
        ("train.precision=fp8", r"train\.precision: got 'fp8' \(str\), expected one of \['fp32', 'bf16', 'fp16'\]"),
        ("head.sample_rate=1.5", r"head\.sample_rate: got 1\.5, expected a value in \[0, 1\]"),
        ("head.num_classes=-3", r"head\.num_classes: got -3, expected a finite value > 0"),
        ("optim.head.lr=fast", r"optim\.head\.lr: got 'fast' \(str\), expected float"),
        ("optim.backbone.betas=[0.9]", r"optim\.backbone\.betas: got \[0\.9\] \(list\), expected a list of 2"),
        ("train.eval_bins=[lfw.bin, 3]", r"train\.eval_bins\[1\]: got 3 \(int\), expected str"),
        ("train.clip_grad_norm=none", r"train\.clip_grad_norm: got 'none' \(str\), expected float \(or int\) or null"),
        ("train.batch_sise=4", r"train\.batch_sise: unknown field; did you mean 'batch_size'\?"),
        ("trian.epochs=4", r"trian: unknown field; did you mean 'train'\?"),
        ("logging.wandb.mode=cloud", r"logging\.wandb\.mode: got 'cloud'"),
        ("train=3", r"train: got 3 \(int\), expected a mapping"),
        ("train.epochs.x=3", r"train\.epochs: got 20, cannot set 'train\.epochs\.x'"),
        ("train.epochs", r"not of the form a\.b\.c=value"),
    ],
)
def test_override_errors_name_field_value_and_expectation(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(CONFIGS / "ms1mv3_r50.yaml", [override])


def test_warmup_steps_and_epochs_conflict():
    assert load_config(CONFIGS / "ms1mv3_r50.yaml", ["schedule.warmup_epochs=1"]).schedule.warmup_epochs == 1.0
    with pytest.raises(ConfigError, match=r"schedule\.warmup_epochs: got 1\.0 while warmup_steps=5, expected only one"):
        load_config(CONFIGS / "ms1mv3_r50.yaml", ["schedule.warmup_steps=5", "schedule.warmup_epochs=1"])


def test_base_chain_is_relative_to_each_file(tmp_path):
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "root.yaml", {"train": {"epochs": 3, "batch_size": 8}, "head": {"margin_params": {"a": 1}}})
    _write(tmp_path / "sub" / "mid.yaml", {"base": "../root.yaml", "train": {"epochs": 5}})
    leaf = _write(tmp_path / "sub" / "leaf.yaml", {"base": "mid.yaml", "head": {"margin_params": {"b": 2}}})
    cfg = load_config(leaf)
    assert (cfg.train.epochs, cfg.train.batch_size) == (5, 8)
    assert cfg.head.margin_params == {"b": 2}


def test_base_errors(tmp_path):
    a = _write(tmp_path / "a.yaml", {"base": "b.yaml"})
    _write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="inheritance cycle"):
        load_config(a)
    missing = _write(tmp_path / "m.yaml", {"base": "nope.yaml"})
    with pytest.raises(ConfigError, match=r"config field base: config file .*nope\.yaml' does not exist"):
        load_config(missing)
    bad = _write(tmp_path / "n.yaml", {"base": 3})
    with pytest.raises(ConfigError, match=r"base: got 3 .*expected a file path"):
        load_config(bad)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


def test_empty_section_keeps_defaults(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\ntrain:\n  epochs: 2\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.data == Config().data and cfg.train.epochs == 2


def test_empty_child_section_keeps_the_base_and_null_cannot_replace_a_section(tmp_path):
    _write(tmp_path / "base.yaml", {"train": {"epochs": 3, "precision": "bf16"}})
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  # epochs: 9\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.train.epochs, cfg.train.precision) == (3, "bf16")
    with pytest.raises(ConfigError, match=r"train: is a section"):
        load_config(tmp_path / "child.yaml", ["train=null"])
    with pytest.raises(ConfigError, match=r"optim\.backbone\.lr: got inf, expected a finite value > 0"):
        load_config(tmp_path / "child.yaml", ["optim.backbone.lr=.inf"])


def test_direct_construction_is_checked():
    with pytest.raises(ConfigError, match=r"lr: got -0\.1, expected a finite value > 0"):
        OptimizerConfig(lr=-0.1)
    with pytest.raises(ConfigError, match="expected only one of them"):
        ScheduleConfig(warmup_steps=5, warmup_epochs=1.0)


def test_resolve_dataset_sizes():
    cfg = load_config(CONFIGS / "synthetic_cpu.yaml")
    filled = resolve_dataset_sizes(cfg, num_classes=100, num_images=2000)
    assert (filled.head.num_classes, filled.data.num_images) == (100, 2000)
    assert cfg.head.num_classes is None  # the input is not changed
    ms1m = load_config(CONFIGS / "ms1mv3_r50.yaml")
    with pytest.raises(ConfigError, match="head.num_classes: got 93431, but the dataset manifest says 100"):
        resolve_dataset_sizes(ms1m, num_classes=100, num_images=5179510)


def test_every_field_has_help_and_help_config_lists_it():
    from largefr.config_schema import field_docs, help_text

    docs = field_docs(Config)
    assert [d.path for d in docs if not d.help.strip()] == []
    text = help_text(Config)
    for doc in docs:
        assert f"{doc.path}: " in text
    assert "head.chunk_rows: int | None = null\n    logits rows held at once" in text
    assert "data.shuffle_buffer: int = 0\n" in text and "train.seed: int = 2048\n" in text


def test_commented_yaml_loads_back_to_the_same_config():
    cfg = load_config(CONFIGS / "synthetic_cpu.yaml", ["train.eval_bins=['a #b.bin', c.bin]", "model.kwargs={x: 'y: z'}"])
    text = cfg.to_commented_yaml()
    assert "  chunk_rows: null  # logits rows held at once" in text
    assert config_from_dict(yaml.safe_load(text)) == cfg


def test_component_options_are_config_fields():
    cfg = load_config(CONFIGS / "synthetic_cpu.yaml", ["head.chunk_rows=3", "data.prefetch=4"])
    assert cfg.head.chunk_rows == 3 and cfg.data.prefetch == 4
    with pytest.raises(ConfigError, match=r"head.chunk_rows: got 0, expected a finite value > 0"):
        load_config(CONFIGS / "synthetic_cpu.yaml", ["head.chunk_rows=0"])
    with pytest.raises(ConfigError, match=r"head.chunk_rows: got 2.5 \(float\), expected int or null"):
        load_config(CONFIGS / "synthetic_cpu.yaml", ["head.chunk_rows=2.5"])
    with pytest.raises(ConfigError, match=r"data.shuffle_buffer: got 64 with loader='torch', expected 0"):
        load_config(CONFIGS / "synthetic_cpu.yaml", ["data.shuffle_buffer=64"])
    assert load_config(CONFIGS / "synthetic_cpu.yaml", ["data.loader=dali", "data.shuffle_buffer=64"]).data.shuffle_buffer == 64


def test_optimizer_arguments_follow_the_choice():
    sgd = OptimizerConfig(name="sgd", lr=0.2, momentum=0.8, weight_decay=1e-4)
    assert sgd.arguments() == {"lr": 0.2, "weight_decay": 1e-4, "momentum": 0.8}
    adamw = OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.05, betas=(0.8, 0.99), eps=1e-6)
    assert adamw.arguments() == {"lr": 1e-3, "weight_decay": 0.05, "betas": (0.8, 0.99), "eps": 1e-6}


def test_the_head_and_its_optimizer_are_built_from_their_sections():
    import torch

    from largefr.distributed import DistContext
    from largefr.heads.row_optim import RowSparseAdamW
    from largefr.train.build import build_head, build_head_optimizer

    cfg = config_from_dict({"head": {"num_classes": 6, "embedding_size": 4, "chunk_rows": 3},
                            "optim": {"head": {"name": "adamw", "lr": 0.01, "weight_decay": 0.1}}})
    head = build_head(cfg, DistContext(0, 1, 0, "gloo", torch.device("cpu"), None))  # type: ignore[arg-type]
    opt = build_head_optimizer(head, cfg.optim.head)
    assert head.chunk_rows == 3 and isinstance(opt, RowSparseAdamW)
    assert opt.param_groups[0]["lr"] == 0.01 and opt.param_groups[0]["weight_decay"] == 0.1
