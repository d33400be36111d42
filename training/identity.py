"""The settings recorded in every checkpoint that define a run, and those a relaunch may change.

Resuming compares them (checkpointing/run_identity.py): another teacher, model, vocabulary or data stops the run.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

import numpy as np

from checkpointing.run_identity import IDENTITY_KEY, RESUMABLE_KEY
from modeling_bert_te import SHAPE_FIELDS
from training.config import DistillConfig

if TYPE_CHECKING:
    from modeling_bert_te import BertTEConfig
    from training.builders import DataBundle
    from training.config import RunConfig
    from training.distributed import DistributedContext

MODEL_SHAPE = (*SHAPE_FIELDS, "use_te_layers")
OPTIMIZATION = (
    "lr",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_eps",
    "warmup_steps",
    "lr_schedule",
    "min_lr_ratio",
    "grad_clip",
)
DISTILLATION = (
    "temperature",
    *(f"{term}_weight" for term in DistillConfig.LOSS_TERMS),
    "layer_map",
    "relation_heads",
    "relation_student_layer",
    "relation_teacher_layer",
    "student_init",
)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def run_identity(run: RunConfig, model_config: BertTEConfig, data: DataBundle, task_meta: dict) -> dict:
    """Flat `setting -> value` of everything that defines the run, as it reads back from JSON."""
    model = model_config.to_dict()
    identity = {
        "seed": run.seed,
        **{f"model.{key}": model.get(key) for key in MODEL_SHAPE},
        "vocabulary_sha256": _sha256("\n".join(data.vocab.tokens).encode()),
        "data.path": str(data.corpus.path),
        "data.cells": len(data.corpus),
        "data.lengths_sha256": _sha256(np.ascontiguousarray(data.corpus.full_lengths).tobytes()),
        "data.mask_prob": run.data.mask_prob,
        "data.heldout_fraction": run.data.heldout_fraction,
        **{f"training.{key}": getattr(run.training, key) for key in OPTIMIZATION},
    }
    if "teacher_sha256" in task_meta:
        identity["distill.teacher_sha256"] = task_meta["teacher_sha256"]
        identity.update({f"distill.{key}": getattr(run.distill, key) for key in DISTILLATION})
    return json.loads(json.dumps(identity))


def resumable_settings(run: RunConfig, ctx: DistributedContext) -> dict:
    """Settings a resume may change (more steps, cadences, world size, strategy); changes are logged."""
    return {
        "training.num_train_steps": run.training.num_train_steps,
        "training.strategy": run.training.strategy,
        "eval.every_steps": run.eval.every_steps,
        "logging.log_every": run.logging.log_every,
        "checkpoint.every_steps": run.checkpoint.every_steps,
        "world_size": ctx.world_size,
    }


def identity_meta(
    run: RunConfig, ctx: DistributedContext, model_config: BertTEConfig, data: DataBundle, task_meta: dict
) -> dict:
    """The two manifest entries a Checkpointer records and compares on resume."""
    return {
        IDENTITY_KEY: run_identity(run, model_config, data, task_meta),
        RESUMABLE_KEY: resumable_settings(run, ctx),
    }
