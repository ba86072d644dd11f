"""Typed training configuration: one dataclass section per component, YAML with ``base:`` inheritance,
``--set a.b=c`` overrides.

Loading order: the ``base:`` chain (each path relative to the file naming it), then the file itself, then
the ``--set`` overrides. Sections (dataclasses) merge field by field; every other value, including the
free-form mappings ``model.kwargs`` and ``head.margin_params``, is replaced whole by a later file (a
``--set`` may still target one key inside them). The merged mapping is then type-checked: an unknown
field, a value of the wrong type or out of range raises :class:`ConfigError` naming the field path.
Every field carries a help string (``largefr train --help-config`` lists them); the machinery is in
:mod:`largefr.config_schema`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from largefr.config_schema import (
    BETAS,
    Check,
    NON_NEGATIVE,
    Check,
    POSITIVE,
    PROB,
    UNIT,
    ConfigError,
    Section,
    apply_override,
    commented_yaml,
    convert,
    plain,
    read_yaml_chain,
    section_field,
)
from largefr.config_schema import config_field as _f  # short: it declares every field below

__all__ = ["Config", "ConfigError", "config_from_dict", "load_config", "resolve_dataset_sizes"]


@dataclass
class DataConfig(Section):
    path: str = _f("", help="dataset directory written by `largefr synth` / `largefr convert` (shards + manifest)")
    loader: Literal["torch", "dali"] = _f("torch", help="torch: PIL in worker processes; dali: NVIDIA DALI (CPU or GPU)")
    num_workers: int = _f(2, NON_NEGATIVE, "decoders: torch DataLoader worker processes or DALI threads "
                          "(0: decode in the training process)")
    prefetch: int = _f(2, POSITIVE, "read-ahead: DALI's prefetch queue depth (batches), torch's chunks per worker")
    shuffle_buffer: int = _f(0, NON_NEGATIVE, "dali only: extra in-pipeline shuffle of this many samples "
                             "(0: the exact planned order, which an exact resume needs)")
    image_size: int = _f(112, POSITIVE, "image side in pixels (the dataset's and the backbone's)")
    num_images: int | None = _f(None, POSITIVE, "images in the dataset; null: read from its manifest")
    random_flip: bool = _f(True, help="random horizontal flip of training images")
    sampler: Literal["uniform", "pk"] = _f("uniform", help="uniform: the epoch order of all samples; pk: P identities "
                                            "x K images per rank batch (pair and triplet losses need it)")
    images_per_identity: int = _f(4, POSITIVE, "K of the pk sampler (identities with fewer images: with replacement)")
    identities_per_batch: int | None = _f(None, POSITIVE, "P of the pk sampler; null: train.batch_size / K "
                                          "(P x K must be train.batch_size)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shuffle_buffer and self.loader != "dali":
            raise ConfigError("shuffle_buffer", f"got {self.shuffle_buffer} with loader={self.loader!r}, "
                              "expected 0 (the shuffle buffer is a DALI reader option)")
        if self.sampler == "pk" and self.images_per_identity < 2:
            raise ConfigError("images_per_identity", f"got {self.images_per_identity} with sampler 'pk', expected "
                              "K >= 2 (a P x K batch needs positives)")
        if self.sampler == "pk" and self.shuffle_buffer:
            raise ConfigError("shuffle_buffer", f"got {self.shuffle_buffer} with sampler 'pk', expected 0 (a "
                              "shuffle would break the P x K batches)")


@dataclass
class ModelConfig(Section):
    name: str = _f("iresnet50", help="backbone, a name from largefr.models.list_backbones()")
    dropout: float = _f(0.0, PROB, "dropout before the embedding layer")
    grad_checkpoint: bool = _f(False, help="activation checkpointing of the backbone's stages (less memory, more compute)")
    kwargs: dict[str, Any] = _f({}, help="extra backbone arguments, e.g. {base_width: 16}")


@dataclass
class HeadConfig(Section):
    margin: str = _f("arcface", help="margin, a name from largefr.heads.margins.MARGINS")
    margin_params: dict[str, Any] = _f({"scale": 64.0, "margin": 0.5}, help="the margin's parameters")
    sample_rate: float = _f(1.0, UNIT, "Partial FC: fraction of each rank's classes scored per step "
                            "(1: all classes, 0: positives only)")
    embedding_size: int = _f(512, POSITIVE, "embedding dimension D")
    num_classes: int | None = _f(None, POSITIVE, "identities; null: read from the dataset manifest")
    chunk_rows: int | None = _f(None, POSITIVE, "logits rows held at once (recomputed in backward); "
                                "null: the whole global batch")
    weight_dtype: Literal["fp32", "bf16", "fp16"] = _f("fp32", help="storage of the W slice; 16 bits: updates "
                                                         "written back with stochastic rounding")
    storage_device: str | None = _f(None, help="where W and its optimizer state live, e.g. cpu (host memory, pinned "
                                          "for GPU steps); null: on the training device")


UNIT_OR_NULL = Check(lambda v: v is None or 0.0 <= v <= 1.0, "a value in [0, 1]")
LOSS_FIELDS: dict[str, dict[str, Any]] = {  # the fields each loss type takes, with their defaults
    "margin_softmax": {},
    "center": {"alpha": 0.5, "normalize": False},
    "contrastive": {"margin": 1.0, "negatives": "all", "hardest_k": 1, "normalize": True},
    "triplet": {"margin": 0.2, "mining": "semi_hard"},
}
PAIR_LOSSES = ("contrastive", "triplet")


@dataclass
class LossTermConfig(Section):
    """One weighted term of the training loss. ``margin_softmax`` is the head (``head.margin``); ``center``
    (Wen et al.; weight = lambda) needs it; ``contrastive`` / ``triplet`` need ``data.sampler: pk``.
    Fields a type does not take must stay unset; unset ones get the defaults of LOSS_FIELDS."""

    type: Literal["margin_softmax", "center", "contrastive", "triplet"] = _f(
        "margin_softmax", help="margin_softmax: the head; center: Wen et al. (needs margin_softmax); contrastive, "
        "triplet: global-batch pair losses (need data.sampler: pk)")
    weight: float = _f(1.0, POSITIVE, "factor of this term in the loss (center: the paper's lambda)")
    margin: float | None = _f(None, POSITIVE, "contrastive m (default 1.0) or triplet alpha (default 0.2)")
    mining: Literal["batch_all", "batch_hard", "semi_hard"] | None = _f(None, help="triplet mining (default semi_hard)")
    negatives: Literal["all", "hardest"] | None = _f(None, help="contrastive negatives: all pairs or each anchor's "
                                                     "hardest_k nearest (default all)")
    hardest_k: int | None = _f(None, POSITIVE, "contrastive with negatives: hardest (default 1)")
    normalize: bool | None = _f(None, help="L2-normalise embeddings first (contrastive default true, center false)")
    alpha: float | None = _f(None, UNIT_OR_NULL, "center: update rate of the centres (default 0.5)")

    def __post_init__(self) -> None:
        super().__post_init__()
        allowed = LOSS_FIELDS[self.type]
        for name in ("margin", "mining", "negatives", "hardest_k", "normalize", "alpha"):
            if name not in allowed and getattr(self, name) is not None:
                raise ConfigError(name, f"got {getattr(self, name)!r}, but a {self.type!r} loss term takes only "
                                  f"{sorted(['type', 'weight', *allowed])}")
            if name in allowed and getattr(self, name) is None:
                setattr(self, name, allowed[name])


def _check_loss_terms(terms: list[LossTermConfig], data: DataConfig, batch_size: int) -> None:
    types = [t.type for t in terms]
    if not types:
        raise ConfigError("loss", "is empty; expected one or more terms, e.g. [{type: margin_softmax}]")
    for i, name in enumerate(types):
        if name in types[:i]:
            raise ConfigError(f"loss[{i}].type", f"{name!r} appears twice; expected each loss type at most once")
    if "center" in types and "margin_softmax" not in types:
        raise ConfigError("loss", "a 'center' term needs a 'margin_softmax' term beside it (Wen et al. train "
                          "centre loss jointly with softmax)")
    pair = [name for name in types if name in PAIR_LOSSES]
    if pair and data.sampler != "pk":
        raise ConfigError("data.sampler", f"is {data.sampler!r}, but the {pair[0]!r} loss needs positives in every "
                          "batch: set data.sampler: pk (P identities x K >= 2 images per batch)")
    if data.sampler == "pk":
        k, p = data.images_per_identity, data.identities_per_batch
        if batch_size % k or (p is not None and p * k != batch_size):
            raise ConfigError("data.images_per_identity", f"P={p} x K={k} does not make train.batch_size="
                              f"{batch_size}; expected K to divide it (and P x K = batch size when P is set)")


@dataclass
class OptimizerConfig(Section):
    name: Literal["sgd", "adamw"] = _f("sgd", help="sgd (with momentum) or adamw")
    lr: float = _f(0.1, POSITIVE, "peak learning rate (see schedule)")
    momentum: float = _f(0.9, PROB, "sgd only")
    weight_decay: float = _f(5e-4, NON_NEGATIVE, "L2 (sgd) or decoupled (adamw) weight decay")
    betas: tuple[float, float] = _f((0.9, 0.999), BETAS, "adamw only")
    eps: float = _f(1e-8, POSITIVE, "adamw only")
    state_dtype: Literal["fp32", "bf16", "fp16"] | None = _f(None, help="head only: momentum / Adam moments storage; "
                                                             "null: the W dtype")

    def arguments(self) -> dict[str, Any]:
        """Keyword arguments of the chosen optimizer, for torch.optim.SGD/AdamW and the head's row-sparse ones."""
        common = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.name == "sgd":
            return {**common, "momentum": self.momentum}
        return {**common, "betas": self.betas, "eps": self.eps}


@dataclass
class OptimConfig(Section):
    backbone: OptimizerConfig = section_field(OptimizerConfig, "optimizer of the backbone (data parallel)")
    head: OptimizerConfig = section_field(OptimizerConfig, "row-sparse optimizer of the head's W slice")


@dataclass
class ScheduleConfig(Section):
    warmup_steps: int | None = _f(None, NON_NEGATIVE, "linear warmup in optimizer steps")
    warmup_epochs: float | None = _f(None, NON_NEGATIVE, "linear warmup in epochs (converted with the steps per epoch)")
    decay: Literal["poly", "cosine"] = _f("poly", help="decay after warmup")
    power: float = _f(2.0, POSITIVE, "poly only: exponent")
    min_lr_ratio: float = _f(0.0, UNIT, "final lr as a fraction of each optimizer's lr")
    total_steps: int | None = _f(None, POSITIVE, "schedule length; null: train.epochs x steps per epoch")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.warmup_steps is not None and self.warmup_epochs is not None:
            raise ConfigError(
                "warmup_epochs",
                f"got {self.warmup_epochs!r} while warmup_steps={self.warmup_steps!r}, expected only one of them",
            )


@dataclass
class TrainConfig(Section):
    batch_size: int = _f(128, POSITIVE, "images per rank per micro-batch")
    grad_accum: int = _f(1, POSITIVE, "micro-batches per optimizer step")
    clip_grad_norm: float | None = _f(5.0, POSITIVE, "backbone gradient norm clip; null disables clipping")
    precision: Literal["fp32", "bf16", "fp16"] = _f("fp32", help="autocast dtype (fp16 with dynamic loss scaling)")
    seed: int = _f(2048, NON_NEGATIVE, "seed of every random stream (largefr.seeding.derive_seed)")
    epochs: int = _f(20, POSITIVE, "passes over the dataset")
    log_every: int = _f(10, POSITIVE, "optimizer steps between metric logs")
    eval_every: int = _f(2000, POSITIVE, "optimizer steps between verification runs")
    eval_bins: list[str] = _f([], help="verification .bin files (lfw.bin, ...): a path, or a name inside data.path")
    collective_timeout_s: float = _f(
        600.0, POSITIVE, "seconds before process-group set-up or any collective fails (a lost peer is an error, not a hang)")
    preempt_check_every: int = _f(1, POSITIVE, "optimizer steps between the ranks' agreement on a received SIGTERM")
    engine: Literal["ddp", "deepspeed"] = _f("ddp", help="how the backbone is data-parallel (the head never is)")


ZERO_STAGES = Check(lambda v: v in (1, 2), "1 or 2 (ZeRO-3 cannot sum gradients, see largefr.train.deepspeed_engine)")


@dataclass
class DeepSpeedConfig(Section):
    """``train.engine: deepspeed``: the backbone in a DeepSpeed ZeRO engine (the DS JSON is generated)."""

    stage: int = _f(1, ZERO_STAGES, "ZeRO stage: 1 partitions optimizer state, 2 also gradients")
    config: str | None = _f(None, help="a DeepSpeed JSON file whose keys override the generated ones")


@dataclass
class CheckpointConfig(Section):
    dir: str | None = _f(None, help="checkpoint directory; null: <output_dir>/checkpoints")
    every_steps: int = _f(2000, POSITIVE, "optimizer steps between checkpoints")
    keep_last: int = _f(2, POSITIVE, "complete checkpoints kept")


@dataclass
class WandbConfig(Section):
    enabled: bool = _f(False, help="log to Weights & Biases")
    project: str = _f("largefr", help="wandb project")
    entity: str | None = _f(None, help="wandb entity (team); null: the default one")
    run_name: str | None = _f(None, help="wandb run name; null: wandb's generated name")
    mode: Literal["offline", "online", "disabled"] = _f("offline", help="wandb mode (offline: sync later)")


@dataclass
class LoggingConfig(Section):
    console: bool = _f(True, help="metrics on the console (rank 0)")
    jsonl: bool = _f(True, help="metrics as JSON lines in <output_dir>/metrics.jsonl")
    wandb: WandbConfig = section_field(WandbConfig, "Weights & Biases logger")


@dataclass
class Config(Section):
    output_dir: str = _f("runs/largefr", help="directory of the run (config.yaml, metrics, checkpoints)")
    data: DataConfig = section_field(DataConfig, "dataset and loader")
    model: ModelConfig = section_field(ModelConfig, "backbone")
    head: HeadConfig = section_field(HeadConfig, "Partial FC head and its margin")
    loss: list[LossTermConfig] = _f([LossTermConfig()], help="weighted loss terms, e.g. [{type: margin_softmax}, "
                                    "{type: center, weight: 0.003}] or {type: triplet} alone (no head)")
    optim: OptimConfig = section_field(OptimConfig, "optimizers")
    schedule: ScheduleConfig = section_field(ScheduleConfig, "learning-rate schedule (by optimizer step)")
    train: TrainConfig = section_field(TrainConfig, "training loop")
    deepspeed: DeepSpeedConfig = section_field(DeepSpeedConfig, "DeepSpeed ZeRO engine (train.engine: deepspeed)")
    checkpoint: CheckpointConfig = section_field(CheckpointConfig, "training checkpoints (DCP, reshardable)")
    logging: LoggingConfig = section_field(LoggingConfig, "metric loggers")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_loss_terms(self.loss, self.data, self.train.batch_size)

    def loss_term(self, name: str) -> LossTermConfig | None:
        """The term of type ``name`` in ``loss``, or None."""
        return next((t for t in self.loss if t.type == name), None)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or str(Path(self.output_dir) / "checkpoints")

    def to_dict(self) -> dict[str, Any]:
        return plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_commented_yaml(self) -> str:
        """:meth:`to_yaml` with each field's help as a comment (what ``--print-config`` shows)."""
        return commented_yaml(self)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a recipe (following ``base:``), apply ``--set`` style overrides and validate."""
    raw = read_yaml_chain(Path(path).resolve(), Config)
    for assignment in overrides:
        apply_override(raw, assignment)
    return config_from_dict(raw)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Validate a plain mapping (e.g. parsed YAML) into a :class:`Config`."""
    if isinstance(raw, dict) and isinstance(raw.get("loss"), dict):  # ``loss: {type: triplet, ...}``: one term
        raw = {**raw, "loss": [raw["loss"]]}
    result = convert(raw, Config)
    if not isinstance(result, Config):
        raise ConfigError("", f"expected a mapping at the top level, got {type(raw).__name__}")
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
