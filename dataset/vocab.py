"""Gene-token vocabulary: token list, special ids, and loading from vocab.txt or a Geneformer pickle.

One object answers "which ids are genes" for the collator, the tokenizer, export and distillation checks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dataset.safe_pickle import load_restricted_pickle

PAD, MASK, CLS, EOS = "<pad>", "<mask>", "<cls>", "<eos>"
SPECIAL_TOKENS = (PAD, MASK, CLS, EOS)
V1_VOCAB_SIZE = 25_426


@dataclass(frozen=True)
class Vocabulary:
    """Tokens in id order; `<pad>` and `<mask>` are required, `<cls>`/`<eos>` exist in V2 only."""

    tokens: tuple[str, ...]

    def __post_init__(self) -> None:
        for name in (PAD, MASK):
            if name not in self.tokens:
                raise ValueError(
                    f"vocabulary has no '{name}' token; Geneformer vocabularies start with <pad>, <mask>"
                )
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("vocabulary has duplicate tokens")

    @property
    def size(self) -> int:
        return len(self.tokens)

    def id_of(self, token: str) -> int | None:
        return self._index().get(token)

    def _index(self) -> dict[str, int]:
        cached = self.__dict__.get("_cached_index")
        if cached is None:
            cached = {token: i for i, token in enumerate(self.tokens)}
            object.__setattr__(self, "_cached_index", cached)
        return cached

    @property
    def pad_id(self) -> int:
        return self._index()[PAD]

    @property
    def mask_id(self) -> int:
        return self._index()[MASK]

    @property
    def cls_id(self) -> int | None:
        return self.id_of(CLS)

    @property
    def eos_id(self) -> int | None:
        return self.id_of(EOS)

    @property
    def cell_ends(self) -> tuple[int, int] | None:
        """(<cls> id, <eos> id) where both exist (V2): the tokens that open and close every cell."""
        cls_id, eos_id = self.cls_id, self.eos_id
        return (cls_id, eos_id) if cls_id is not None and eos_id is not None else None

    @property
    def special_ids(self) -> tuple[int, ...]:
        return tuple(i for i in (self.id_of(t) for t in SPECIAL_TOKENS) if i is not None)

    @property
    def first_gene_id(self) -> int:
        """Genecorpus vocabularies put every special token before the first gene."""
        return max(self.special_ids) + 1

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        """Read `vocab.txt` (one token a line, line number = id) or a Geneformer token-dictionary pickle."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"vocabulary file {path} does not exist; pass a vocab.txt or token_dictionary .pkl"
            )
        if path.suffix == ".pkl":
            return cls.from_token_dict(load_restricted_pickle(path), source=str(path))
        tokens = tuple(line.rstrip("\n") for line in path.read_text().splitlines())
        return cls(tokens)

    @classmethod
    def from_token_dict(cls, token_to_id: dict, source: str = "token dictionary") -> Vocabulary:
        ids = sorted(int(i) for i in token_to_id.values())
        if ids != list(range(len(ids))):
            raise ValueError(f"{source}: token ids are not 0..{len(ids) - 1} without gaps")
        tokens = [""] * len(ids)
        for token, i in token_to_id.items():
            tokens[int(i)] = str(token)
        return cls(tuple(tokens))

    @classmethod
    def synthetic(cls, size: int = V1_VOCAB_SIZE) -> Vocabulary:
        """V1-shaped vocabulary (<pad>, <mask>, then genes) with made-up gene names, for the built-in corpus."""
        return cls((PAD, MASK) + tuple(f"SYNGENE{i:06d}" for i in range(2, size)))

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text("\n".join(self.tokens) + "\n")
