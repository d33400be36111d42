"""The distillation task for the shared loop: a frozen teacher, a student with learned projections, the losses.

The teacher runs once per micro-batch under inference_mode; both models compute logits at masked positions only.
"""

from __future__ import annotations

import torch
from torch import nn

from dataset.batch import labelled_rows, model_inputs
from distillation.losses import hidden_mse_mean, kd_kl_sum, relation_kl_mean, token_mask
from modeling_bert_te import BertForMaskedLM
from training.config import DistillConfig
from training.masked_lm_metrics import masked_lm_metrics
from training.parallelize import unwrap


def default_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Student layer i (1-based output) learns from teacher layer round(i * Lt / Ls): evenly spaced, last to last."""
    return [(i, round(i * teacher_layers / student_layers)) for i in range(1, student_layers + 1)]


class StudentWithProjections(nn.Module):
    """What the optimizer trains: the student plus student->teacher width projections for the hidden loss.

    Its forward runs the student (so DDP and FSDP2 see every trainable parameter used inside forward).
    """

    def __init__(self, student: BertForMaskedLM, teacher_width: int, n_projections: int) -> None:
        super().__init__()
        self.student = student
        self.projections = nn.ModuleList(
            nn.Linear(student.config.hidden_size, teacher_width) for _ in range(n_projections)
        )

    def forward(self, *, want_hidden: list[int] = (), **student_kwargs):
        out = self.student(output_hidden_states=bool(want_hidden), **student_kwargs)
        if not want_hidden:  # evaluation, or no hidden-state loss
            return out, []
        projected = [
            proj(out.hidden_states[i]) for proj, i in zip(self.projections, want_hidden, strict=True)
        ]
        return out, projected


class _StudentView(nn.Module):
    """Calls the wrapped container for evaluation; FSDP2 needs the root module's forward to gather weights."""

    def __init__(self, wrapped: nn.Module) -> None:
        super().__init__()
        self.wrapped = wrapped

    def forward(self, **kwargs):
        return self.wrapped(**kwargs)[0]


class DistillationLoss:
    """Callable (model, batch) -> summed loss terms, with the teacher held outside the trained module."""

    def __init__(
        self,
        teacher: BertForMaskedLM,
        cfg: DistillConfig,
        layer_map: list[tuple[int, int]],
        n_student_heads: int,
    ) -> None:
        self.teacher, self.cfg = teacher, cfg
        self.student_layers = [s for s, _ in layer_map] if cfg.hidden_weight > 0 else []
        self.teacher_layers = [t for _, t in layer_map] if cfg.hidden_weight > 0 else []
        self.relation_heads = cfg.relation_heads or n_student_heads

    def teacher_outputs(self, batch: dict):
        cfg = self.cfg
        with torch.inference_mode():
            out = self.teacher(
                **model_inputs(batch),
                output_hidden_states=bool(self.teacher_layers),
                return_qkv_layer=cfg.relation_teacher_layer if cfg.relation_weight > 0 else None,
            )
        # Clone out of inference mode: these tensors take part in the student's autograd graph.
        hidden = [out.hidden_states[i].float().clone() for i in self.teacher_layers]
        qkv = tuple(t.float().clone() for t in out.qkv) if cfg.relation_weight > 0 else None
        return out.logits.float().clone(), hidden, qkv

    def __call__(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        t_logits, t_hidden, t_qkv = self.teacher_outputs(batch)
        s_out, s_projected = model(
            want_hidden=self.student_layers,
            **model_inputs(batch),
            return_qkv_layer=cfg.relation_student_layer if cfg.relation_weight > 0 else None,
        )
        labelled = labelled_rows(s_out.masked_labels)
        n_masked = labelled.sum()
        terms = {
            "mlm": s_out.loss * n_masked,
            "kd": kd_kl_sum(s_out.logits, t_logits, cfg.temperature, labelled),
        }
        mask = token_mask(
            batch.get("attention_mask"), batch["input_ids"].view(-1, batch["input_ids"].shape[-1])
        )
        if cfg.hidden_weight > 0:
            mse = sum(hidden_mse_mean(s, t, mask) for s, t in zip(s_projected, t_hidden, strict=True))
            terms["hidden"] = mse / len(t_hidden) * n_masked
        if cfg.relation_weight > 0:
            terms["relation"] = relation_kl_mean(s_out.qkv, t_qkv, self.relation_heads, mask) * n_masked
        weights = cfg.weights()
        # A term weighted 0 is logged but left out of the sum, so no backward pass runs through it.
        loss = sum(weights[name] * value for name, value in terms.items() if weights[name] > 0)
        return {"loss": loss, **{name: value.detach() for name, value in terms.items()}}


def evaluate_side_by_side(
    teacher: BertForMaskedLM, wrapped: nn.Module, batches: list[dict]
) -> dict[str, float]:
    """Held-out metrics of teacher and student on the same masked cells, flattened for the metrics log."""
    student = _StudentView(unwrap(wrapped))
    device = next(wrapped.parameters()).device
    results = masked_lm_metrics({"teacher": teacher, "student": student}, batches, device)
    flat = {f"teacher_{k}": v for k, v in results["teacher"].items()}
    flat.update({f"student_{k}": v for k, v in results["student"].items()})
    flat["loss"], flat["accuracy"] = results["student"]["loss"], results["student"]["accuracy"]
    return flat
