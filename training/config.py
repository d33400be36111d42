"""Typed run configuration: the schema hydra's YAML is checked against, and its validation.

Unknown keys, wrong types and out-of-range values fail here, before any heavy work, naming the key.
"""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError


class ConfigError(ValueError):
    """A config value a user set is invalid; the message names the key and the allowed values."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config '{key}': {message}")


# What FP8 GEMM dimensions (tokens, widths) must divide by: FP8 tensor cores need 16; MXFP8 scales blocks of 32.
FP8_ALIGNMENT = 16
MXFP8_ALIGNMENT = 32


def fp8_alignment(fp8: str, recipe: str) -> int:
    """The alignment FP8 GEMMs of this setting need (training.fp8, training.fp8_recipe)."""
    return MXFP8_ALIGNMENT if fp8 == "te" and recipe == "mxfp8" else FP8_ALIGNMENT


def _one_of(value: str, key: str, allowed: tuple[str, ...]) -> None:
    _require(value in allowed, key, f"got '{value}', allowed: {', '.join(allowed)}")


@dataclass
class ModelConfig:
    """The keys a model section (hydra_config/model/*.yaml) may set: BertTEConfig's fields, each checked for type.

    Keys left out keep Hugging Face BertConfig's defaults; a key not listed here is refused, not exported.
    """

    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    intermediate_size: int | None = None
    hidden_act: str | None = None
    hidden_dropout_prob: float | None = None
    attention_probs_dropout_prob: float | None = None
    max_position_embeddings: int | None = None
    type_vocab_size: int | None = None
    initializer_range: float | None = None
    layer_norm_eps: float | None = None
    pad_token_id: int | None = None
    classifier_dropout: float | None = None
    use_te_layers: bool | None = None


@dataclass
class DataConfig:
    path: str | None = None  # parquet file / shard dir / Arrow dir; None = the built-in corpus
    vocab: str | None = None  # vocab.txt or token-dictionary .pkl; None = <path>/vocab.txt if present
    builtin_cells: int = 4000
    builtin_dir: str = "outputs/builtin_corpus"
    cache_dir: str | None = None
    heldout_fraction: float = 0.02
    max_tokens: int = 16384
    max_cells: int | None = None
    mask_prob: float = 0.15
    pad_to_multiple_of: int = 8
    packed: bool = False
    num_workers: int = 1

    def validate(self) -> None:
        _require(self.max_tokens > 0, "data.max_tokens", "must be > 0")
        _require(self.max_cells is None or self.max_cells > 0, "data.max_cells", "must be > 0 or null")
        _require(0.0 < self.mask_prob < 1.0, "data.mask_prob", "must be in (0, 1)")
        _require(0.0 < self.heldout_fraction < 1.0, "data.heldout_fraction", "must be in (0, 1)")
        _require(self.pad_to_multiple_of >= 1, "data.pad_to_multiple_of", "must be >= 1 (8; 16 for FP8)")
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _require(self.builtin_cells > 0, "data.builtin_cells", "must be > 0")


@dataclass
class TrainingConfig:
    strategy: str = "ddp"  # ddp | fsdp2
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on cuda, fp32 on cpu) | fp32 | bf16
    num_train_steps: int = 100
    grad_accum_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-8
    warmup_steps: int = 10
    lr_schedule: str = "linear"  # linear | cosine | constant
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    activation_checkpointing: bool = False
    compile: bool = False
    # Static-shape packed batches and a step replayed as CUDA graphs (torch.compile mode=reduce-overhead): for small
    # models bound by kernel launches. Needs a CUDA GPU, data.packed=true and data.max_cells; replaces `compile`.
    cuda_graphs: bool = False
    fp8: str = (
        "off"  # off | torchao (float8 on nn.Linear) | te (Transformer Engine layers, model.use_te_layers)
    )
    fp8_recipe: str = (
        "delayed"  # with fp8=te: delayed | current (per-tensor scaling) | mxfp8 (Blackwell and newer)
    )
    fp8_scaling: str = "tensorwise"  # with fp8=torchao: tensorwise | rowwise
    fp8_layers: str = (
        "auto"  # with fp8=torchao: auto (only GEMMs large enough to gain) | all (every aligned one)
    )
    nonfinite: str = "stop"  # stop | skip
    stop_after_steps: int | None = (
        None  # checkpoint and exit after this many steps of this launch (job time limits)
    )

    def fp8_alignment(self) -> int:
        return fp8_alignment(self.fp8, self.fp8_recipe)

    def validate(self) -> None:
        _one_of(self.strategy, "training.strategy", ("ddp", "fsdp2"))
        _one_of(self.device, "training.device", ("auto", "cpu", "cuda"))
        _one_of(self.precision, "training.precision", ("auto", "fp32", "bf16"))
        _one_of(self.lr_schedule, "training.lr_schedule", ("linear", "cosine", "constant"))
        _one_of(self.nonfinite, "training.nonfinite", ("stop", "skip"))
        _one_of(self.fp8, "training.fp8", ("off", "torchao", "te"))
        _one_of(self.fp8_recipe, "training.fp8_recipe", ("delayed", "current", "mxfp8"))
        _one_of(self.fp8_scaling, "training.fp8_scaling", ("tensorwise", "rowwise"))
        _one_of(self.fp8_layers, "training.fp8_layers", ("auto", "all"))
        _require(self.num_train_steps > 0, "training.num_train_steps", "must be > 0")
        _require(self.grad_accum_steps > 0, "training.grad_accum_steps", "must be > 0")
        _require(self.lr > 0, "training.lr", "must be > 0")
        _require(self.weight_decay >= 0, "training.weight_decay", "must be >= 0")
        _require(
            0 <= self.warmup_steps < self.num_train_steps,
            "training.warmup_steps",
            f"must be in [0, num_train_steps={self.num_train_steps})",
        )
        _require(0.0 <= self.min_lr_ratio <= 1.0, "training.min_lr_ratio", "must be in [0, 1]")
        _require(
            self.stop_after_steps is None or self.stop_after_steps > 0,
            "training.stop_after_steps",
            "must be > 0 or null",
        )
        _require(self.grad_clip >= 0, "training.grad_clip", "must be >= 0 (0 disables clipping)")


@dataclass
class CheckpointConfig:
    dir: str = "outputs/run/checkpoints"
    every_steps: int = 100
    keep_last: int = 3
    async_save: bool = False
    resume: bool = True
    allow_changed_run: bool = (
        False  # resume even if the teacher, model, data or optimization settings changed
    )

    def validate(self) -> None:
        _require(self.every_steps > 0, "checkpoint.every_steps", "must be > 0")
        _require(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")


@dataclass
class EvalConfig:
    every_steps: int = 100
    max_cells: int = 512
    seed: int = 1234

    def validate(self) -> None:
        _require(self.every_steps > 0, "eval.every_steps", "must be > 0")
        _require(self.max_cells > 0, "eval.max_cells", "must be > 0")


@dataclass
class LoggingConfig:
    log_every: int = 10
    progress_bar: bool = True
    wandb: bool = False
    wandb_mode: str = "offline"  # offline | online
    wandb_project: str = "geneformer-recipe"
    wandb_entity: str | None = None  # W&B team or user; None = your default entity
    wandb_name: str | None = None  # None = the output folder's name
    wandb_group: str | None = (
        None  # None = none, but distill.py groups its teacher with its student, a sweep its jobs
    )
    wandb_tags: list[str] = field(default_factory=list)
    plot: bool = True

    def validate(self) -> None:
        _require(self.log_every > 0, "logging.log_every", "must be > 0")
        _one_of(self.wandb_mode, "logging.wandb_mode", ("offline", "online"))
        _require(
            not self.wandb or importlib.util.find_spec("wandb") is not None,
            "logging.wandb",
            "true, but wandb is not installed: pip install -r requirements.txt, or set logging.wandb=false",
        )


@dataclass
class DistillConfig:
    teacher: str | None = None  # model directory; None = first pretrain a teacher on the same data
    teacher_model: str = "tiny"  # hydra_config/model/<name> of the teacher pretrained when teacher is None
    teacher_steps: int = 300
    teacher_lr: float = 3e-3
    teacher_precision: str = "auto"  # auto (bf16 on cuda, fp32 on cpu) | fp32 | bf16
    temperature: float = 1.0
    kd_weight: float = 1.0
    mlm_weight: float = 0.0
    hidden_weight: float = 0.0
    layer_map: list[list[int]] | None = None  # [[student_layer, teacher_layer], ...]; None = uniform
    relation_weight: float = 0.0
    relation_heads: int | None = None  # None = the student's head count
    relation_student_layer: int = -1
    relation_teacher_layer: int = -1
    student_init: str = "teacher"  # random | teacher (PCA embeddings, copy matching layers)

    # The loss terms, each weighted by the field `<term>_weight` above and computed in distillation/task.py.
    LOSS_TERMS = ("kd", "mlm", "hidden", "relation")

    def weights(self) -> dict[str, float]:
        return {term: getattr(self, f"{term}_weight") for term in self.LOSS_TERMS}

    def validate(self) -> None:
        _require(self.temperature > 0, "distill.temperature", "must be > 0")
        _require(self.teacher_steps > 0, "distill.teacher_steps", "must be > 0")
        for term, weight in self.weights().items():
            _require(weight >= 0, f"distill.{term}_weight", "must be >= 0")
        _require(sum(self.weights().values()) > 0, "distill.*_weight", "at least one loss weight must be > 0")
        _one_of(self.student_init, "distill.student_init", ("random", "teacher"))
        _one_of(self.teacher_precision, "distill.teacher_precision", ("auto", "fp32", "bf16"))
        _require(
            self.relation_heads is None or self.relation_heads > 0, "distill.relation_heads", "must be > 0"
        )


@dataclass
class FinetuneConfig:
    model_dir: str | None = (
        None  # exported masked-LM directory; None = first pretrain `model` on the same data
    )
    pretrain_steps: int = 300
    pretrain_lr: float = 3e-3
    label_column: str = "cell_type"  # corpus column holding each cell's class (empty / null = unlabelled)
    freeze_layers: int = 0  # k > 0 freezes the embeddings and the first k encoder layers

    def validate(self) -> None:
        _require(self.pretrain_steps > 0, "finetune.pretrain_steps", "must be > 0")
        _require(self.pretrain_lr > 0, "finetune.pretrain_lr", "must be > 0")
        _require(
            bool(self.label_column),
            "finetune.label_column",
            "must name a column of the corpus (e.g. cell_type)",
        )
        _require(self.freeze_layers >= 0, "finetune.freeze_layers", "must be >= 0")


@dataclass
class RunConfig:
    seed: int = 42
    output_dir: str = "outputs/run"
    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distill: DistillConfig | None = None
    finetune: FinetuneConfig | None = None

    def validate(self) -> RunConfig:
        # Packed batches need no padding: under FP8 the model rounds their token count up itself.
        align = self.training.fp8_alignment()
        _require(
            self.training.fp8 == "off" or self.data.packed or self.data.pad_to_multiple_of % align == 0,
            "data.pad_to_multiple_of",
            f"must be a multiple of {align} with training.fp8 and padded batches (FP8 "
            f"GEMMs need dimensions divisible by {align}); set it to {align}, or use data.packed=true",
        )
        for part in (
            self.data,
            self.training,
            self.checkpoint,
            self.eval,
            self.logging,
            self.distill,
            self.finetune,
        ):
            if part is not None:
                part.validate()
        self._validate_cuda_graphs()
        _require(
            bool(self.model), "model", "no model given; pick one with model=<name> (hydra_config/model/)"
        )
        _require(
            self.distill is None or self.distill.relation_weight == 0 or not self.data.packed,
            "distill.relation_weight",
            "self-attention relations are per cell; set data.packed=false with them",
        )
        _require(
            self.training.fp8 != "te" or bool(self.model.get("use_te_layers")),
            "training.fp8",
            "'te' runs FP8 through Transformer Engine layers; set model.use_te_layers=true, or use "
            "training.fp8=torchao for plain layers",
        )
        widths = {key: self.model.get(key) for key in ("hidden_size", "intermediate_size")}
        _require(
            self.training.fp8 != "te" or all(isinstance(w, int) and w % align == 0 for w in widths.values()),
            "training.fp8",
            f"'te' needs model.hidden_size and model.intermediate_size divisible by {align} "
            f"(Transformer Engine layers cannot keep one GEMM in bf16); got {widths}. Use a wider model, or "
            "training.fp8=torchao, which leaves such layers in bf16",
        )
        return self

    def _validate_cuda_graphs(self) -> None:
        """CUDA graphs replay fixed shapes on one CUDA device: refuse, naming the fix, what cannot be captured."""
        if not self.training.cuda_graphs:
            return
        needs = {
            "data.packed": (self.data.packed, "static shapes are packed batches; set data.packed=true"),
            "data.max_cells": (
                self.data.max_cells is not None,
                "the static cell count comes from it; set the most cells a micro-batch may hold",
            ),
            "training.device": (
                self.training.device != "cpu",
                "CUDA graphs need a CUDA GPU; set training.cuda_graphs=false on CPU",
            ),
            "training.strategy": (
                self.training.strategy == "ddp",
                "FSDP2's per-layer gathers cannot be captured; use training.strategy=ddp",
            ),
            "training.fp8": (
                self.training.fp8 != "te",
                "Transformer Engine layers are not captured here; use training.fp8=torchao or off",
            ),
        }
        for key, (ok, fix) in needs.items():
            _require(ok, key, f"with training.cuda_graphs=true: {fix}")


_SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "training": TrainingConfig,
    "checkpoint": CheckpointConfig,
    "eval": EvalConfig,
    "logging": LoggingConfig,
    "distill": DistillConfig,
    "finetune": FinetuneConfig,
}


def _allowed_keys() -> list[str]:
    """Every dotted key the schema allows ('seed', 'training.lr', ...)."""
    keys = []
    for item in fields(RunConfig):
        section = _SECTIONS.get(item.name)
        keys += [f"{item.name}.{key.name}" for key in fields(section)] if section else [item.name]
    return keys


def unknown_key_error(key: str) -> ConfigError:
    """The one-line error for a key the schema does not have, with the nearest allowed key as the likely fix."""
    near = difflib.get_close_matches(key, _allowed_keys(), n=1, cutoff=0.75)
    hint = f"did you mean '{near[0]}'? " if near else ""
    return ConfigError(f"unknown config key '{key}'; {hint}see training/config.py for the allowed keys")


def _merge(schema: type, raw: dict, prefix: str = ""):
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), raw)
    except ConfigKeyError as error:
        raise unknown_key_error(prefix + error.full_key) from None
    except ValidationError as error:
        # omegaconf appends the key and schema on further lines; the first line is the message.
        raise ConfigError(f"config '{prefix}{error.full_key}': {error.msg.splitlines()[0]}") from None


def parse_config(cfg: DictConfig | dict) -> RunConfig:
    """Check a composed config against the schema and return it as typed, validated objects."""
    raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    raw.pop("hydra", None)
    # The model section stays a plain dict of the keys it sets (BertConfig defaults the rest), checked key by key.
    model = raw.get("model") or {}
    checked = OmegaConf.to_container(_merge(ModelConfig, model, "model."))
    raw["model"] = {key: checked[key] for key in model}
    return OmegaConf.to_object(_merge(RunConfig, raw)).validate()
