"""Stock BERT weights: read them from a model directory, check their shapes against a config, and rename them to
and from Transformer Engine layers (q, k, v fused into one `qkv`).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from common.checksums import CHECKSUM_ALGORITHM, checksum_problem

if TYPE_CHECKING:
    from modeling_bert_te import BertTEConfig

# Stock checkpoint keys that carry no learned state of ours: buffers, the unused pooler, the tied decoder bias.
_HARMLESS_EXTRA_PREFIXES = (
    "bert.embeddings.position_ids",
    "bert.embeddings.token_type_ids",
    "bert.pooler.",
    "cls.predictions.decoder.bias",
)
TIED_DECODER_KEY = "cls.predictions.decoder.weight"
_WORD_EMBEDDINGS_KEY = "bert.embeddings.word_embeddings.weight"


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CHECKSUMS_NAME = "checksums.json"  # written by this recipe's exports: {"crc32c": {file name: hex digest}}


def weights_path(model_dir: Path) -> Path:
    """The weight file of a model directory (model.safetensors preferred over pytorch_model.bin)."""
    for name in WEIGHT_FILES:
        if (model_dir / name).is_file():
            return model_dir / name
    raise FileNotFoundError(
        f"{model_dir} holds no weights (model.safetensors or pytorch_model.bin): export the model again or "
        "point at its final_model folder (sharded checkpoints: merge them first)"
    )


def verify_export_checksums(model_dir: Path, names: tuple[str, ...] = (*WEIGHT_FILES, "config.json")) -> None:
    """Check files `names` of an exported directory against its checksums.json (stock directories have none)."""
    record_path = model_dir / CHECKSUMS_NAME
    if not record_path.is_file():
        return
    try:
        expected = dict(json.loads(record_path.read_text())[CHECKSUM_ALGORITHM])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"{record_path}: unreadable ({error}); re-export the model or delete this file"
        ) from None
    problems = [
        checksum_problem(model_dir / name, crc)
        for name, crc in expected.items()
        if name in names and (model_dir / name).is_file()
    ]
    problems = [p for p in problems if p]
    if problems:
        named = "; ".join(
            f"{model_dir / problem}".replace("the manifest", CHECKSUMS_NAME) for problem in problems
        )
        raise ValueError(f"{named}. The files changed after export: copy or export the model again")


def read_config_json(model_dir: str | Path) -> dict:
    """The one guarded reader of a model directory's config.json: checked against the export's checksums, parsed,
    and every failure a FileNotFoundError / ValueError that names the file and the fix."""
    model_dir = Path(model_dir)
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist; check the path")
    if not path.is_file():
        raise FileNotFoundError(
            f"{model_dir} has no config.json; give an exported model directory (the final_model of train.py, "
            "distill.py or finetune.py) or a stock BERT directory"
        )
    verify_export_checksums(model_dir, ("config.json",))
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{path}: unreadable ({type(error).__name__}: {error}); the file is truncated or corrupt: copy, "
            "download or export the model again"
        ) from None
    if not isinstance(config, dict):
        raise ValueError(
            f"{path}: holds a {type(config).__name__}, not a JSON object; export the model again"
        )
    return config


def load_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The one guarded reader of a model directory's weights (teacher, finetune.model_dir, evaluate, embed, export).

    Verifies the export's checksums, then reads model.safetensors, else pytorch_model.bin (weights only: a pickle
    from a user is untrusted). Any failure is a ValueError / FileNotFoundError that names the file and the fix.
    """
    model_dir = Path(model_dir)
    path = weights_path(model_dir)
    verify_export_checksums(model_dir)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path}: refused, it holds more than tensors ({str(error).splitlines()[0]}); "
            "only load weights from sources you trust, preferably as model.safetensors"
        ) from None
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as error:
        first_line = (str(error).splitlines() or [""])[0]
        raise ValueError(
            f"{path}: unreadable weights ({type(error).__name__}: {first_line}); the file is truncated "
            "or corrupt: copy, download or export the model again"
        ) from None


def normalize_stock_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop keys known to be harmless (buffers, pooler, tied decoder bias); rename old gamma/beta LayerNorm names."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(_HARMLESS_EXTRA_PREFIXES):
            continue
        if key.endswith("LayerNorm.gamma"):
            key = key[: -len("gamma")] + "weight"
        elif key.endswith("LayerNorm.beta"):
            key = key[: -len("beta")] + "bias"
        out[key] = value
    return out


def check_against_config(sd: dict[str, torch.Tensor], config: BertTEConfig, source: str) -> None:
    """Vocabulary, positions and hidden size in the checkpoint must agree with the config."""
    checks = {
        _WORD_EMBEDDINGS_KEY: ((config.vocab_size, config.hidden_size), "vocab_size / hidden_size"),
        "bert.embeddings.position_embeddings.weight": (
            (config.max_position_embeddings, config.hidden_size),
            "max_position_embeddings / hidden_size",
        ),
        "cls.predictions.bias": ((config.vocab_size,), "vocab_size"),
    }
    for key, (shape, fields) in checks.items():
        if key in sd and tuple(sd[key].shape) != shape:
            raise ValueError(
                f"{source}: {key} has shape {tuple(sd[key].shape)} but the config ({fields}) needs "
                f"{shape}; the checkpoint and config (or vocabulary) disagree"
            )
    reference = _stock_shapes(config)
    for key, value in sd.items():
        if key in reference and tuple(value.shape) != reference[key]:
            raise ValueError(
                f"{source}: {key} has shape {tuple(value.shape)}, the config needs {reference[key]}"
            )


def _stock_shapes(config: BertTEConfig) -> dict[str, tuple[int, ...]]:
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        _WORD_EMBEDDINGS_KEY: (v, h),
        "bert.embeddings.position_embeddings.weight": (config.max_position_embeddings, h),
        "bert.embeddings.token_type_embeddings.weight": (config.type_vocab_size, h),
        "bert.embeddings.LayerNorm.weight": (h,),
        "bert.embeddings.LayerNorm.bias": (h,),
        "cls.predictions.transform.dense.weight": (h, h),
        "cls.predictions.transform.dense.bias": (h,),
        "cls.predictions.transform.LayerNorm.weight": (h,),
        "cls.predictions.transform.LayerNorm.bias": (h,),
        "cls.predictions.bias": (v,),
        TIED_DECODER_KEY: (v, h),
    }
    for n in range(config.num_hidden_layers):
        p = f"bert.encoder.layer.{n}."
        for name in ("query", "key", "value"):
            shapes[f"{p}attention.self.{name}.weight"], shapes[f"{p}attention.self.{name}.bias"] = (
                (h, h),
                (h,),
            )
        shapes.update(
            {
                f"{p}attention.output.dense.weight": (h, h),
                f"{p}attention.output.dense.bias": (h,),
                f"{p}attention.output.LayerNorm.weight": (h,),
                f"{p}attention.output.LayerNorm.bias": (h,),
                f"{p}intermediate.dense.weight": (i, h),
                f"{p}intermediate.dense.bias": (i,),
                f"{p}output.dense.weight": (h, i),
                f"{p}output.dense.bias": (h,),
                f"{p}output.LayerNorm.weight": (h,),
                f"{p}output.LayerNorm.bias": (h,),
            }
        )
    return shapes


# Stock per-layer name -> Transformer Engine TransformerLayer name (post-LN layout, see model/te_layers.py).
_TE_RENAMES = {
    "attention.output.dense.weight": "self_attention.proj.weight",
    "attention.output.dense.bias": "self_attention.proj.bias",
    "attention.output.LayerNorm.weight": "layernorm_mlp.layer_norm_weight",
    "attention.output.LayerNorm.bias": "layernorm_mlp.layer_norm_bias",
    "intermediate.dense.weight": "layernorm_mlp.fc1_weight",
    "intermediate.dense.bias": "layernorm_mlp.fc1_bias",
    "output.dense.weight": "layernorm_mlp.fc2_weight",
    "output.dense.bias": "layernorm_mlp.fc2_bias",
    "output.LayerNorm.weight": "layernorm.weight",
    "output.LayerNorm.bias": "layernorm.bias",
}
_LAYER_PREFIX = "bert.encoder.layer."


def _layer_entries(
    sd: dict[str, torch.Tensor],
    out: dict[str, torch.Tensor],
) -> Iterator[tuple[str, str, str, torch.Tensor]]:
    """(key, layer prefix, name within the layer, value) of each encoder-layer entry; others are copied to `out`."""
    for key, value in sd.items():
        if not key.startswith(_LAYER_PREFIX):
            out[key] = value
            continue
        index, _, rest = key[len(_LAYER_PREFIX) :].partition(".")
        yield key, f"{_LAYER_PREFIX}{index}.", rest, value


def stock_to_te_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stock names -> TE layer names; q, k, v are concatenated into the fused `self_attention.qkv`."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, prefix, rest, value in _layer_entries(sd, out):
        if rest.startswith("attention.self."):
            which, kind = rest[len("attention.self.") :].split(".")
            qkv.setdefault((prefix, kind), {})[which] = value
        elif rest in _TE_RENAMES:
            out[prefix + _TE_RENAMES[rest]] = value
        else:
            raise ValueError(f"state dict key {key} has no Transformer Engine counterpart")
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(
                f"{prefix}attention.self.*.{kind}: need query, key and value, got {sorted(parts)}"
            )
        out[f"{prefix}self_attention.qkv.{kind}"] = torch.cat(
            [parts["query"], parts["key"], parts["value"]], dim=0
        )
    return out


def to_stock_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any of our state dicts (plain or TE layers) -> stock names; TE's FP8 `_extra_state` entries are dropped."""
    inverse = {te: stock for stock, te in _TE_RENAMES.items()}
    out: dict[str, torch.Tensor] = {}
    kept = {key: value for key, value in sd.items() if not key.endswith("_extra_state")}
    for key, prefix, rest, value in _layer_entries(kept, out):
        if rest.startswith("self_attention.qkv."):
            kind = rest.rsplit(".", 1)[1]
            q, k, v = value.chunk(3, dim=0)
            for name, part in (("query", q), ("key", k), ("value", v)):
                out[f"{prefix}attention.self.{name}.{kind}"] = part
        elif rest in inverse:
            out[prefix + inverse[rest]] = value
        else:
            out[key] = value
    return out
