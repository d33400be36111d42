"""Export any committed training checkpoint as a stock-loadable model directory, on one CPU process.

python -m checkpointing.export_checkpoint outputs/10m/checkpoints/step_00001000 --out my_model
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from checkpointing.manifest import checksum_problems, read_manifest
from common.errors import run_cli
from dataset.vocab import Vocabulary
from model.hf_dir import export_model_dir
from modeling_bert_te import BertForMaskedLM, BertTEConfig


def export_checkpoint(checkpoint_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Read the model weights of a committed checkpoint (DDP or FSDP2, any world size) and export them."""
    checkpoint_dir = Path(checkpoint_dir)
    record = read_manifest(checkpoint_dir)
    problems = checksum_problems(checkpoint_dir, record["files"])
    if problems:
        raise ValueError(f"{checkpoint_dir}: " + "; ".join(problems) + "; export an earlier step_N directory")
    meta = record["meta"]
    if "model_config" not in meta:
        raise ValueError(
            f"{checkpoint_dir}: the manifest records no model_config; was it written by this recipe?"
        )
    config = BertTEConfig(**{k: v for k, v in meta["model_config"].items() if k not in ("model_type",)})
    model = BertForMaskedLM(config)
    prefix = meta.get("export_prefix", "")
    weights = {f"model.{prefix}{k}": v for k, v in model.state_dict().items()}
    dcp.load(weights, checkpoint_id=str(checkpoint_dir))
    state = {k[len("model.") + len(prefix) :]: v for k, v in weights.items()}
    vocab_file = Path(meta.get("vocab_tokens_file", ""))
    vocab = Vocabulary.load(vocab_file) if vocab_file.is_file() else None
    return export_model_dir(state, config, Path(out_dir), vocab, overwrite=overwrite)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a step_N directory holding COMMITTED.json")
    parser.add_argument("--out", required=True, help="model directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    args = parser.parse_args(argv)
    with torch.no_grad():
        out = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"exported {args.checkpoint} -> {out}")


if __name__ == "__main__":
    run_cli(main)  # an uncommitted or foreign directory, or an occupied --out: one line saying which
