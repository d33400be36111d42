"""Gene tables for tokenizing counts: vocabulary, gene medians, symbol -> Ensembl maps and Ensembl id mappings.

Reads Geneformer pickles (restricted unpickler, never arbitrary code) or plain TSV/CSV, and maps input genes.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from dataset.safe_pickle import load_restricted_pickle
from dataset.vocab import CLS, EOS, MASK, PAD, Vocabulary

logger = logging.getLogger(__name__)

# ENSG00000123456.12 -> ENSG00000123456; other species' prefixes (ENSMUSG...) too. Suffixes such as
# "_PAR_Y" are kept, so the Y copy of a pseudo-autosomal gene is not silently merged with the X copy.
_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*G\d+)\.\d+$")
_ENSEMBL_ID = re.compile(r"^ENS[A-Z]*G\d+")


def strip_ensembl_version(gene_id: str) -> str:
    """Drop an Ensembl version suffix (`ENSG00000141510.17` -> `ENSG00000141510`); other names unchanged."""
    if "." not in gene_id:  # the common case, without a regex
        return gene_id
    match = _ENSEMBL_VERSION.match(gene_id)
    return match.group(1) if match else gene_id


def looks_like_ensembl(gene_id: str) -> bool:
    return bool(_ENSEMBL_ID.match(gene_id))


def _read_two_column_table(path: Path, what: str) -> list[tuple[str, str]]:
    """Rows of a 2-column TSV/CSV (tab if the file has tabs, else comma); a header row is allowed."""
    text = path.read_text()
    delimiter = "\t" if "\t" in text.split("\n", 1)[0] else ","
    rows = []
    for line_no, row in enumerate(csv.reader(text.splitlines(), delimiter=delimiter), start=1):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) < 2:
            raise ValueError(
                f"{path}, line {line_no}: {what} table needs two columns (key, value); got {row!r}"
            )
        rows.append((row[0].strip(), row[1].strip()))
    if not rows:
        raise ValueError(f"{path}: {what} table is empty")
    return rows


def _load_mapping(path: str | Path, what: str) -> tuple[Path, dict | list[tuple[str, str]]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} file {path} does not exist; pass a Geneformer .pkl or a two-column TSV"
        )
    if path.suffix == ".pkl":
        table = load_restricted_pickle(path)
        if not isinstance(table, dict):
            raise ValueError(f"{path}: {what} pickle must hold a dict, found {type(table).__name__}")
        return path, table
    return path, _read_two_column_table(path, what)


def load_vocabulary(path: str | Path) -> Vocabulary:
    """vocab.txt (one token a line), a Geneformer token-dictionary .pkl, or a TSV of `token<TAB>id`."""
    path = Path(path)
    if path.suffix in (".tsv", ".csv"):
        rows = _read_two_column_table(path, "vocabulary")
        if not rows[0][1].lstrip("-").isdigit():
            rows = rows[1:]  # header
        try:
            return Vocabulary.from_token_dict({token: int(i) for token, i in rows}, source=str(path))
        except ValueError as error:
            raise ValueError(f"{path}: vocabulary rows must be `token<TAB>integer id` ({error})") from error
    return Vocabulary.load(path)


def load_medians(path: str | Path) -> dict[str, float]:
    """Gene -> nonzero median of normalized expression, from a Geneformer .pkl or a `gene<TAB>median` TSV."""
    path, table = _load_mapping(path, "gene median")
    items = table.items() if isinstance(table, dict) else table
    medians: dict[str, float] = {}
    for row, (gene, value) in enumerate(items, start=1):
        try:
            median = float(value)
        except ValueError:
            if row == 1 and not isinstance(table, dict):
                continue  # header line of a TSV
            raise ValueError(f"{path}: median of gene {gene!r} is {value!r}, not a number") from None
        if not math.isfinite(median) or median <= 0:
            raise ValueError(f"{path}: median of gene {gene!r} is {median}; medians must be finite and > 0")
        medians[strip_ensembl_version(str(gene))] = median
    return medians


def load_symbol_table(path: str | Path) -> dict[str, str]:
    """Gene symbol -> Ensembl id, from a Geneformer name-dictionary .pkl or a two-column TSV/CSV.

    Column order of a TSV/CSV is detected: the column whose values look like Ensembl ids is the target
    (GENCODE tables are `id,symbol`, Geneformer's are `symbol -> id`). A symbol listed with several ids
    keeps its first; how many were ambiguous is logged.
    """
    path, table = _load_mapping(path, "gene name")
    rows = [(str(k), str(v)) for k, v in table.items()] if isinstance(table, dict) else table
    first_is_id = sum(looks_like_ensembl(a) for a, _ in rows[:1000])
    second_is_id = sum(looks_like_ensembl(b) for _, b in rows[:1000])
    if max(first_is_id, second_is_id) == 0:
        raise ValueError(
            f"{path}: neither column holds Ensembl ids (ENSG...); a gene name table maps symbols to ids"
        )
    if first_is_id > second_is_id:
        rows = [(b, a) for a, b in rows]
    mapping: dict[str, str] = {}
    ambiguous = 0
    for symbol, gene_id in rows:
        if not looks_like_ensembl(gene_id):
            continue  # header or a row without an id
        gene_id = strip_ensembl_version(gene_id)
        previous = mapping.setdefault(symbol, gene_id)
        ambiguous += previous != gene_id
    if ambiguous:
        logger.info(
            "%s: %d symbols listed with more than one Ensembl id; the first listed is used", path, ambiguous
        )
    return mapping


def load_gene_mapping(path: str | Path, keep: set[str] | None = None) -> dict[str, str]:
    """Gene id / symbol / alias -> Ensembl id, keys upper-cased (Geneformer's `ensembl_mapping_dict` .pkl or a
    two-column TSV/CSV). With `keep`, only entries whose target is in `keep` (the vocabulary), as Geneformer's
    tokenizer filters its mapping."""
    path, table = _load_mapping(path, "gene mapping")
    rows = table.items() if isinstance(table, dict) else table
    mapping: dict[str, str] = {}
    for key, value in rows:
        target = strip_ensembl_version(str(value).strip())
        if looks_like_ensembl(target) and (keep is None or target in keep):
            mapping[strip_ensembl_version(str(key).strip()).upper()] = target
    if not mapping:
        raise ValueError(
            f"{path}: no entry maps to an Ensembl id{' of the vocabulary' if keep else ''}; a gene "
            "mapping is `id or symbol -> Ensembl id` (e.g. Geneformer's ensembl_mapping_dict_gc104M.pkl)"
        )
    return mapping


def to_ensembl_ids(
    names: Sequence[str], symbols: dict[str, str] | None, mapping: dict[str, str] | None = None
) -> list[str | None]:
    """Input gene names -> Ensembl ids (version stripped); a name that is neither an id nor known maps to None.

    With `mapping` (see `load_gene_mapping`) every name, id or symbol, is looked up upper-cased first, as
    Geneformer's tokenizer does, so a gene given under an alternate id reaches its vocabulary id. Other names
    fall back to the id itself or, for symbols, to `symbols` (exact, then upper-case).
    """
    upper = {k.upper(): v for k, v in symbols.items()} if symbols else {}
    out: list[str | None] = []
    for name in names:
        name = str(name).strip()
        gene_id = strip_ensembl_version(name) if looks_like_ensembl(name) else None
        mapped = mapping.get((gene_id or name).upper()) if mapping else None
        if mapped is None and gene_id is None and symbols is not None:
            gene_id = symbols.get(name) or upper.get(name.upper())
            mapped = mapping.get(gene_id.upper()) if mapping and gene_id else None
        out.append(mapped or gene_id)
    return out


@dataclass(frozen=True)
class GeneColumnMap:
    """Where each input column goes: `target[j]` is the slot (0..n_slots-1) of column j, or -1 if dropped.

    Slots are ordered by ascending token id, so a row's slots sorted ascending are in vocabulary order;
    several columns sharing one slot (duplicate Ensembl ids) have their counts summed.
    """

    target: np.ndarray  # int64 [n_columns]
    token_ids: np.ndarray  # int64 [n_slots]
    medians: np.ndarray  # float64 [n_slots]
    gene_ids: tuple[str, ...]  # Ensembl id per slot
    n_columns: int
    n_mapped_to_ensembl: int

    @property
    def n_slots(self) -> int:
        return len(self.token_ids)

    @cached_property
    def all_mapped(self) -> bool:
        """Every input column has a vocabulary slot (no entry needs dropping for its gene)."""
        return bool((self.target >= 0).all())

    @cached_property
    def has_duplicates(self) -> bool:
        kept = self.target[self.target >= 0]
        return len(kept) != len(np.unique(kept))


def build_column_map(
    ensembl_ids: Sequence[str | None], vocab: Vocabulary, medians: dict[str, float] | None, *, source: str
) -> GeneColumnMap:
    """Keep input columns whose Ensembl id is a vocabulary gene; attach that gene's token id and median.

    `medians=None` builds the map without medians (all ones), for the pass that computes them.
    """
    special = {PAD, MASK, CLS, EOS}
    token_of = {t: i for i, t in enumerate(vocab.tokens) if t not in special}
    in_vocab = sorted({g for g in ensembl_ids if g is not None and g in token_of}, key=token_of.__getitem__)
    if medians is not None:
        missing = [g for g in in_vocab if g not in medians]
        if missing:
            raise ValueError(
                f"{source}: {len(missing)} vocabulary genes present in the input have no median "
                f"(e.g. {missing[:3]}); pass a medians table that covers the vocabulary or use --compute-medians"
            )
    slot_of = {g: s for s, g in enumerate(in_vocab)}
    target = np.array([slot_of.get(g, -1) if g is not None else -1 for g in ensembl_ids], dtype=np.int64)
    return GeneColumnMap(
        target=target,
        token_ids=np.array([token_of[g] for g in in_vocab], dtype=np.int64),
        medians=np.array([medians[g] if medians is not None else 1.0 for g in in_vocab], dtype=np.float64),
        gene_ids=tuple(in_vocab),
        n_columns=len(ensembl_ids),
        n_mapped_to_ensembl=sum(g is not None for g in ensembl_ids),
    )


def vocabulary_from_genes(genes: Sequence[str], *, layout: str) -> Vocabulary:
    """A Geneformer-shaped vocabulary for genes seen in the input: specials first, then genes sorted by id."""
    specials = (PAD, MASK, CLS, EOS) if layout == "v2" else (PAD, MASK)
    return Vocabulary(specials + tuple(sorted(set(genes))))
