"""Initialize a student from its teacher: PCA-projected embeddings, the output bias, matching layers copied.

Word and position embeddings are about 80% of a 4M student's parameters, so starting them well matters most.
"""

from __future__ import annotations

import logging

import torch

from modeling_bert_te import BertForMaskedLM

log = logging.getLogger(__name__)
_EMBEDDINGS = ("word_embeddings", "position_embeddings", "token_type_embeddings")


def pca_basis(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [H], basis [H, k]): the top-k principal directions of the rows of `matrix`."""
    matrix = matrix.float()
    mean = matrix.mean(0)
    _, _, vh = torch.linalg.svd(matrix - mean, full_matrices=False)
    return mean, vh[:k].T


def _copy_layers(student: BertForMaskedLM, teacher: BertForMaskedLM, layer_map: list[tuple[int, int]]) -> int:
    copied = 0
    for s_index, t_index in layer_map:
        s_layer = student.bert.encoder.layer[s_index]
        t_layer = teacher.bert.encoder.layer[t_index]
        t_state = t_layer.state_dict()
        if all(t_state[k].shape == v.shape for k, v in s_layer.state_dict().items() if k in t_state):
            s_layer.load_state_dict({k: v.float() for k, v in t_state.items()})
            copied += 1
    return copied


@torch.no_grad()
def init_student_from_teacher(
    student: BertForMaskedLM, teacher: BertForMaskedLM, layer_map: list[tuple[int, int]]
) -> None:
    """Project the teacher's embeddings onto their top principal components; copy what has the same shape."""
    s_width = student.config.hidden_size
    t_emb, s_emb = teacher.bert.embeddings, student.bert.embeddings
    mean, basis = (
        pca_basis(t_emb.word_embeddings.weight, s_width)
        if s_width < teacher.config.hidden_size
        else (None, None)
    )
    for name in _EMBEDDINGS:
        source = getattr(t_emb, name).weight.float()
        target = getattr(s_emb, name).weight
        rows = min(source.shape[0], target.shape[0])
        projected = source[:rows] if basis is None else (source[:rows] - mean) @ basis
        width = min(s_width, projected.shape[1])  # a wider student keeps its own init in the extra columns
        target[:rows, :width] = projected[:, :width]
    student.cls.predictions.bias.copy_(teacher.cls.predictions.bias.float())
    copied = _copy_layers(student, teacher, layer_map)
    student.tie_weights()
    log.info(
        "student initialized from the teacher: PCA embeddings (%d -> %d), output bias, %d of %d layers copied",
        teacher.config.hidden_size,
        s_width,
        copied,
        len(student.bert.encoder.layer),
    )
