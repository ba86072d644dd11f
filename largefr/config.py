"""Typed training configuration: dataclasses, YAML with ``base:`` inheritance, ``--set a.b=c`` overrides.

Loading order: the ``base:`` chain (each path relative to the file naming it), then the file itself, then
the ``--set`` overrides. Sections (dataclasses) merge field by field; every other value, including the
free-form mappings ``model.kwargs`` and ``head.margin_params``, is replaced whole by a later file (a
``--set`` may still target one key inside them). The merged mapping is then type-checked: an unknown
field, a value of the wrong type or out of range raises :class:`ConfigError` naming the field path.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config value that does not fit the schema; ``path`` is the dotted field name."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"config field {path}: {message}" if path else f"config: {message}")
        self.path = path
        self.detail = message


@dataclass(frozen=True)
class Check:
    """A value constraint with the words used to describe it in errors."""

    ok: Callable[[Any], bool]
    expected: str


POSITIVE = Check(lambda v: v is None or (v > 0 and math.isfinite(v)), "a finite value > 0")
NON_NEGATIVE = Check(lambda v: v is None or (v >= 0 and math.isfinite(v)), "a finite value >= 0")
UNIT = Check(lambda v: 0.0 <= v <= 1.0, "a value in [0, 1]")
PROB = Check(lambda v: 0.0 <= v < 1.0, "a value in [0, 1)")
BETAS = Check(lambda v: all(0.0 <= b < 1.0 for b in v), "two values in [0, 1)")


def _f(default: Any, check: Check | None = None) -> Any:
    """A dataclass field with an optional constraint; mutable defaults are copied per instance."""
    meta = {"check": check} if check else {}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


class Section:
    """Base of every config section: runs the field constraints on construction."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            check: Check | None = f.metadata.get("check")
            value = getattr(self, f.name)
            if check is not None and not check.ok(value):
                raise ConfigError(f.name, f"got {value!r}, expected {check.expected}")


@dataclass
class DataConfig(Section):
    path: str = ""  # dataset directory (shards + manifest)
    loader: Literal["torch", "dali"] = "torch"
    num_workers: int = _f(2, NON_NEGATIVE)
    image_size: int = _f(112, POSITIVE)
    num_images: int | None = _f(None, POSITIVE)  # read from the dataset manifest when null
    random_flip: bool = True


@dataclass
class ModelConfig(Section):
    name: str = "iresnet50"  # a name from largefr.models.list_backbones()
    dropout: float = _f(0.0, PROB)
    grad_checkpoint: bool = False
    kwargs: dict[str, Any] = _f({})  # extra backbone arguments, e.g. {base_width: 16}


@dataclass
class HeadConfig(Section):
    margin: str = "arcface"  # a name from largefr.heads.margins.MARGINS
    margin_params: dict[str, Any] = _f({"scale": 64.0, "margin": 0.5})
    sample_rate: float = _f(1.0, UNIT)  # Partial FC: 1 = all classes, 0 = positives only
    embedding_size: int = _f(512, POSITIVE)
    num_classes: int | None = _f(None, POSITIVE)  # read from the dataset manifest when null


@dataclass
class OptimizerConfig(Section):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = _f(0.1, POSITIVE)
    momentum: float = _f(0.9, PROB)  # sgd only
    weight_decay: float = _f(5e-4, NON_NEGATIVE)
    betas: tuple[float, float] = _f((0.9, 0.999), BETAS)  # adamw only
    eps: float = _f(1e-8, POSITIVE)  # adamw only


@dataclass
class OptimConfig(Section):
    backbone: OptimizerConfig = field(default_factory=OptimizerConfig)
    head: OptimizerConfig = field(default_factory=OptimizerConfig)


@dataclass
class ScheduleConfig(Section):
    warmup_steps: int | None = _f(None, NON_NEGATIVE)
    warmup_epochs: float | None = _f(None, NON_NEGATIVE)  # converted with the steps per epoch
    decay: Literal["poly", "cosine"] = "poly"
    power: float = _f(2.0, POSITIVE)  # poly only
    min_lr_ratio: float = _f(0.0, UNIT)  # final lr as a fraction of each optimizer's lr
    total_steps: int | None = _f(None, POSITIVE)  # default: train.epochs x steps per epoch

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.warmup_steps is not None and self.warmup_epochs is not None:
            raise ConfigError(
                "warmup_epochs",
                f"got {self.warmup_epochs!r} while warmup_steps={self.warmup_steps!r}, expected only one of them",
            )


@dataclass
class TrainConfig(Section):
    batch_size: int = _f(128, POSITIVE)  # per rank
    grad_accum: int = _f(1, POSITIVE)
    clip_grad_norm: float | None = _f(5.0, POSITIVE)  # backbone only; null disables clipping
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 2048
    epochs: int = _f(20, POSITIVE)
    log_every: int = _f(10, POSITIVE)
    eval_every: int = _f(2000, POSITIVE)
    eval_bins: list[str] = _f([])  # verification .bin files (lfw.bin, cfp_fp.bin, ...)
    engine: Literal["ddp", "deepspeed"] = "ddp"  # how the backbone is data-parallel (the head never is)


ZERO_STAGES = Check(lambda v: v in (1, 2), "1 or 2 (ZeRO-3 cannot sum gradients, see largefr.train.deepspeed_engine)")


@dataclass
class DeepSpeedConfig(Section):
    """``train.engine: deepspeed``: the backbone in a DeepSpeed ZeRO engine (the DS JSON is generated)."""

    stage: int = _f(1, ZERO_STAGES)  # ZeRO stage: 1 partitions optimizer state, 2 also gradients
    config: str | None = None  # a DeepSpeed JSON file whose keys override the generated ones


@dataclass
class CheckpointConfig(Section):
    dir: str | None = None  # default: <output_dir>/checkpoints
    every_steps: int = _f(2000, POSITIVE)
    keep_last: int = _f(2, POSITIVE)


@dataclass
class WandbConfig(Section):
    enabled: bool = False
    project: str = "largefr"
    entity: str | None = None
    run_name: str | None = None
    mode: Literal["offline", "online", "disabled"] = "offline"


@dataclass
class LoggingConfig(Section):
    console: bool = True
    jsonl: bool = True  # <output_dir>/metrics.jsonl
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config(Section):
    output_dir: str = "runs/largefr"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or str(Path(self.output_dir) / "checkpoints")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_scalar(text: str) -> Any:
    """A ``--set`` value as YAML would read it (``0.1``, ``1e-3``, ``true``, ``null``, ``[a, b]``)."""
    return yaml.load(text, Loader=_Loader) if text.strip() else ""


def _read_yaml(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    if path in chain:
        raise ConfigError("base", f"inheritance cycle: {' -> '.join(map(str, (*chain, path)))}")
    if not path.is_file():
        raise ConfigError("base" if chain else "", f"config file {str(path)!r} does not exist")
    raw = yaml.load(path.read_text(), Loader=_Loader) or {}
    if not isinstance(raw, dict):
        raise ConfigError("", f"{path} must hold a mapping at the top level, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError("base", f"got {base!r} in {path}, expected a file path (str)")
    parent = _read_yaml((path.parent / base).resolve(), (*chain, path))
    return _merge(Config, parent, raw)


def _merge(cls: type, base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Field-wise merge for sections (dataclasses); any other value is replaced whole."""
    hints = get_type_hints(cls)
    out = dict(base)
    for key, value in override.items():
        tp = hints.get(key)
        if dataclasses.is_dataclass(tp) and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(tp, out[key], value)
        elif dataclasses.is_dataclass(tp) and value is None:
            continue  # an empty section in the child ("train:" with every key commented out) keeps the base's
        else:
            out[key] = value
    return out


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` to a raw config mapping in place (the value parsed as YAML)."""
    key, sep, text = assignment.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError("", f"override {assignment!r} is not of the form a.b.c=value")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            path = ".".join(parts[: i + 1])
            raise ConfigError(path, f"got {child!r}, cannot set {key!r} inside a value that is not a section")
        node = child
    value = parse_scalar(text)
    if value is None and isinstance(node.get(parts[-1]), dict):
        raise ConfigError(key.strip(), "is a section; set its fields (a.b=value), it cannot be replaced by null")
    node[parts[-1]] = value


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a recipe (following ``base:``), apply ``--set`` style overrides and validate."""
    raw = _read_yaml(Path(path).resolve(), ())
    for assignment in overrides:
        apply_override(raw, assignment)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Validate a plain mapping (e.g. parsed YAML) into a :class:`Config`."""
    result = _convert(raw, Config, "")
    assert isinstance(result, Config)
    return result


def resolve_dataset_sizes(cfg: Config, num_classes: int, num_images: int) -> Config:
    """Fill ``head.num_classes`` / ``data.num_images`` from a dataset manifest; a mismatch is an error."""
    for path, current, actual in (
        ("head.num_classes", cfg.head.num_classes, num_classes),
        ("data.num_images", cfg.data.num_images, num_images),
    ):
        if current is not None and current != actual:
            raise ConfigError(path, f"got {current}, but the dataset manifest says {actual}")
    head = dataclasses.replace(cfg.head, num_classes=num_classes)
    data = dataclasses.replace(cfg.data, num_images=num_images)
    return dataclasses.replace(cfg, head=head, data=data)


# ---------------------------------------------------------------------------------------- validation


def _join(path: str, key: str | int) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)


def _describe(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is tuple:
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
    if origin is dict:
        return "a mapping"
    return {int: "int", float: "float (or int)", bool: "bool (true/false)", str: "str"}.get(tp, str(tp))


def _type_error(value: Any, tp: Any, path: str) -> ConfigError:
    return ConfigError(path, f"got {value!r} ({type(value).__name__}), expected {_describe(tp)}")


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _convert_section(value, tp, path)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, path)
            except ConfigError:
                continue
        raise _type_error(value, tp, path)
    if origin is Literal:
        if value in args and isinstance(value, str):
            return value
        raise _type_error(value, tp, path)
    if origin in (list, tuple):
        return _convert_sequence(value, tp, path)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _type_error(value, tp, path)
        return {k: _convert(v, args[1], _join(path, k)) for k, v in value.items()}
    return _convert_scalar(value, tp, path)


def _convert_scalar(value: Any, tp: Any, path: str) -> Any:
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (bool, str) and isinstance(value, tp):
        return value
    raise _type_error(value, tp, path)


def _convert_sequence(value: Any, tp: Any, path: str) -> Any:
    args = get_args(tp)
    if not isinstance(value, (list, tuple)):
        raise _type_error(value, tp, path)
    if get_origin(tp) is list:
        return [_convert(v, args[0], _join(path, i)) for i, v in enumerate(value)]
    if len(value) != len(args):
        raise _type_error(value, tp, path)
    return tuple(_convert(v, a, _join(path, i)) for i, (v, a) in enumerate(zip(value, args)))


def _convert_section(value: Any, cls: type, path: str) -> Any:
    value = {} if value is None else value  # an empty YAML section ("data:") keeps the defaults
    if not isinstance(value, dict):
        raise _type_error(value, cls, path)
    hints = get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in value:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(_join(path, str(key)), f"unknown field; {hint}known fields: {known}")
    kwargs = {k: _convert(v, hints[k], _join(path, k)) for k, v in value.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(_join(path, exc.path), exc.detail) from None


def _plain(value: Any) -> Any:
    """Tuples to lists (recursively) so safe_dump writes plain YAML."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
