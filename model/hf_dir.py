"""Export a model to a stock Hugging Face BertForMaskedLM directory (safetensors, config.json, tokenizer files).

Written atomically, so a directory that looks complete is complete; stock `transformers` loads it as is.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from common.checksums import CHECKSUM_ALGORITHM, file_crc32c
from common.file_modes import make_umask_readable, public_mkdtemp
from model.bert_weights import CHECKSUMS_NAME, normalize_stock_state_dict, to_stock_state_dict

if TYPE_CHECKING:
    from dataset.vocab import Vocabulary
    from modeling_bert_te import BertTEConfig

# Stock transformers ties these on load; writing them too would show up as unexpected/duplicate keys.
_TIED_KEYS = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
# Config fields only this recipe knows; stock transformers would carry them along harmlessly, but a clean
# config.json keeps the export indistinguishable from a stock BertForMaskedLM directory.
RECIPE_ONLY_FIELDS = ("use_te_layers",)


def _stock_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = normalize_stock_state_dict(to_stock_state_dict(state_dict))
    out = {}
    for key, value in sd.items():
        if key in _TIED_KEYS:
            continue
        if hasattr(value, "full_tensor"):  # a DTensor shard from FSDP2: gather the whole parameter
            value = value.full_tensor()
        # safetensors needs contiguous, unshared CPU storage (q/k/v views of a fused TE weight share storage).
        out[key] = value.detach().to("cpu").contiguous().clone()
    return out


def write_tokenizer_files(vocab: Vocabulary, out_dir: Path) -> None:
    """vocab.txt plus a fast tokenizer (tokenizer.json) that `AutoTokenizer.from_pretrained` loads.

    One whitespace-separated gene id = one token, case kept. V1 cells get no special tokens (Geneformer V1 has
    none); V2 cells are wrapped in <cls> ... <eos> by default, as the V2 model expects. There is no unknown
    token: a gene outside the vocabulary (or a gene symbol) raises instead of silently becoming <pad>.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab.save(out_dir / "vocab.txt")
    ids = {token: i for i, token in enumerate(vocab.tokens)}
    # An unk_token absent from the vocabulary makes WordLevel refuse unknown words ("Missing [UNK] token").
    tokenizer = Tokenizer(models.WordLevel(ids, unk_token="<unknown gene>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {"pad_token": "<pad>", "mask_token": "<mask>"}
    if vocab.cell_ends is not None:
        special |= {"cls_token": "<cls>", "sep_token": "<eos>"}
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<cls> $A <eos>", special_tokens=[("<cls>", vocab.cls_id), ("<eos>", vocab.eos_id)]
        )
    tokenizer.add_special_tokens(list(special.values()))
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_input_names": ["input_ids", "attention_mask"],  # one segment: no token_type_ids
        "clean_up_tokenization_spaces": False,
        **special,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def export_model_dir(
    state_dict: dict[str, torch.Tensor],
    config: BertTEConfig,
    out_dir: Path,
    vocab: Vocabulary | None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write model.safetensors + config.json (+ tokenizer files when `vocab` is given) to `out_dir` atomically."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"export target {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"export target {out_dir} is not empty; choose a new directory or pass overwrite=True"
        )
    if vocab is not None and vocab.size != config.vocab_size:
        raise ValueError(
            f"vocabulary has {vocab.size} tokens but the model config has vocab_size "
            f"{config.vocab_size}; export with the vocabulary the model was trained on"
        )
    tensors = _stock_tensors(state_dict)
    config_dict = config.to_dict()
    for field in RECIPE_ONLY_FIELDS:
        config_dict.pop(field, None)
    config_dict.update(architectures=["BertForMaskedLM"], model_type="bert", tie_word_embeddings=True)

    return write_model_dir(out_dir, tensors, config_dict, vocab)


def write_checksums(directory: Path) -> None:
    """Record the CRC32C of every file in `directory` (readers verify them), and give each the umask's mode."""
    files = sorted(p for p in directory.iterdir() if p.is_file())
    record = {CHECKSUM_ALGORITHM: {p.name: file_crc32c(p) for p in files}}
    (directory / CHECKSUMS_NAME).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    for path in directory.iterdir():
        make_umask_readable(path)  # safetensors writes 0600 whatever the umask


def write_model_dir(
    out_dir: Path, tensors: dict[str, torch.Tensor], config_dict: dict, vocab: Vocabulary | None
) -> Path:
    """Write weights, config.json and tokenizer files into a temporary folder, then rename it into place.

    A crash or a full disk leaves either the previous directory or the new one, never a half-written one.
    checksums.json records every file's CRC32C; files and folder get the modes the umask gives.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = public_mkdtemp(out_dir.parent, prefix=f".{out_dir.name}.tmp-")
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
        if vocab is not None:
            write_tokenizer_files(vocab, tmp)
        write_checksums(tmp)
        if out_dir.exists():
            # Move the old directory aside first so that the rename below is a single atomic step.
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, old / "dir")
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
