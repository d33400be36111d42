"""Load the frozen teacher on every rank and check it against the data and the student before any step.

The teacher is never wrapped, never optimized, never checkpointed: only its path and weight hash are recorded.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from dataset.vocab import Vocabulary
from model.bert_weights import WEIGHT_FILES, weights_path
from modeling_bert_te import BertForMaskedLM, BertTEConfig

log = logging.getLogger(__name__)


def weights_file(model_dir: Path) -> Path:
    try:
        return weights_path(model_dir)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"teacher directory {model_dir} holds no weights ({' or '.join(WEIGHT_FILES)}); "
            "set distill.teacher to a directory exported by train.py or a Hugging Face BERT"
        ) from None


def weights_sha256(model_dir: Path) -> str:
    digest = hashlib.sha256()
    with weights_file(model_dir).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_teacher(model_dir: str | Path, device: torch.device, dtype: torch.dtype) -> BertForMaskedLM:
    """The teacher in eval mode, frozen, on `device` in `dtype` (bf16 on GPU halves its memory and time)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"config 'distill.teacher': {model_dir} is not a directory")
    weights_file(model_dir)
    teacher = BertForMaskedLM.from_pretrained(model_dir)
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher.to(device=device, dtype=dtype)


def check_teacher(
    teacher_dir: Path, teacher: BertTEConfig, student: BertTEConfig, vocab: Vocabulary, longest_cell: int
) -> None:
    """Refuse a teacher whose vocabulary, special ids or positions disagree with the data or the student."""
    where = f"teacher {teacher_dir}"
    if teacher.vocab_size != vocab.size or student.vocab_size != vocab.size:
        raise ValueError(
            f"vocabulary mismatch: {where} has vocab_size {teacher.vocab_size}, the data vocabulary "
            f"{vocab.size}, the student {student.vocab_size}; distil with data tokenized with the "
            "teacher's vocabulary and set model.vocab_size to match"
        )
    teacher_vocab_file = teacher_dir / "vocab.txt"
    if teacher_vocab_file.is_file():
        teacher_tokens = Vocabulary.load(teacher_vocab_file).tokens
        if teacher_tokens != vocab.tokens:
            first = next(
                i for i, (a, b) in enumerate(zip(teacher_tokens, vocab.tokens, strict=False)) if a != b
            )
            raise ValueError(
                f"vocabulary mismatch: {teacher_vocab_file} differs from the data vocabulary at id "
                f"{first} ('{teacher_tokens[first]}' vs '{vocab.tokens[first]}'); the corpus must be "
                "tokenized with the teacher's vocabulary"
            )
    if teacher.pad_token_id is not None and teacher.pad_token_id != vocab.pad_id:
        raise ValueError(
            f"{where}: pad_token_id {teacher.pad_token_id} but the data's <pad> id is {vocab.pad_id}"
        )
    if teacher.max_position_embeddings < longest_cell:
        raise ValueError(
            f"{where} has {teacher.max_position_embeddings} positions but the data holds cells of "
            f"{longest_cell} tokens; lower model.max_position_embeddings of the student to "
            f"{teacher.max_position_embeddings} so cells are truncated to what the teacher can read"
        )
