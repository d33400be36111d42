"""Small serving on CPU: cells/s and file size of a student as fp32 PyTorch, ONNX fp32 and ONNX INT8 (dynamic),
and the INT8 accuracy loss on held-out masked-LM cells with fixed masks.

Run: python benchmarks/serving.py MODEL_DIR [--max-length 512] [--cells 128] [--threads 2]
(without MODEL_DIR it trains a 2m student with `train.py --config-name l0_sanity` first).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dataset.builtin_corpus import ensure_builtin_corpus  # noqa: E402
from dataset.collator import MLMCollator  # noqa: E402
from dataset.corpus import CellCorpus  # noqa: E402
from dataset.split import split_indices  # noqa: E402
from dataset.vocab import Vocabulary  # noqa: E402
from modeling_bert_te import BertForMaskedLM  # noqa: E402
from serving.export_onnx import export_model, run_session, session  # noqa: E402


def train_student(out: Path, steps: int, max_length: int) -> Path:
    cmd = [sys.executable, str(ROOT / "train.py"), "--config-name", "l0_sanity", "model=2m",
           f"model.max_position_embeddings={max_length}", f"output_dir={out}", f"training.num_train_steps={steps}",
           "logging.progress_bar=false", "logging.plot=false", f"hydra.run.dir={out}/hydra"]
    print("$ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return out / "final_model"


def batches(cells: list[np.ndarray], collator: MLMCollator, max_tokens: int) -> list[dict]:
    """Length-sorted batches under a token budget (as the training sampler builds them), fixed masks."""
    order = np.argsort([len(c) for c in cells], kind="stable")
    out, current = [], []
    for i in order:
        longest = max([len(cells[j]) for j in current] + [len(cells[i])])
        if current and longest * (len(current) + 1) > max_tokens:
            out.append(collator.fixed_masks([cells[j] for j in current], batch_index=len(out)))
            current = []
        current.append(i)
    out.append(collator.fixed_masks([cells[j] for j in current], batch_index=len(out)))
    return out


def masked_stats(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log-prob of the true gene, predicted gene) at each masked position."""
    keep = labels != -100
    rows = torch.from_numpy(np.ascontiguousarray(logits[keep])).float()
    log_probs = rows.log_softmax(-1)
    true = torch.from_numpy(labels[keep])
    return log_probs.gather(1, true[:, None]).squeeze(1).numpy(), rows.argmax(-1).numpy()


def run_engine(name: str, forward, data: list[dict]) -> dict:
    forward(data[0])  # warm-up: allocators and onnxruntime's first-run graph work
    start = time.perf_counter()
    true_lp, preds, labels = [], [], []
    for batch in data:
        logits = forward(batch)
        lp, pred = masked_stats(logits, batch["labels"].numpy())
        true_lp.append(lp)
        preds.append(pred)
        labels.append(batch["labels"].numpy()[batch["labels"].numpy() != -100])
    seconds = time.perf_counter() - start
    n_cells = sum(len(b["input_ids"]) for b in data)
    true_lp, preds, labels = np.concatenate(true_lp), np.concatenate(preds), np.concatenate(labels)
    return {"name": name, "cells_s": n_cells / seconds, "acc": float((preds == labels).mean()),
            "ppl": float(np.exp(-true_lp.mean())), "preds": preds}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir", nargs="?", default=None, metavar="MODEL_DIR",
                   help="student directory (default: train a 2m student on the built-in corpus first)")
    p.add_argument("--train-steps", type=int, default=150, help="steps of that student, when none is given")
    p.add_argument("--builtin-dir", default=str(ROOT / "outputs" / "builtin_corpus"))
    p.add_argument("--max-length", type=int, default=512, help="cells are truncated to this many genes")
    p.add_argument("--cells", type=int, default=80, help="held-out cells to serve (0 = all held-out cells)")
    p.add_argument("--max-tokens", type=int, default=4096, help="token budget of a batch")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of PyTorch and onnxruntime")
    p.add_argument("--work", default=None, help="where the ONNX files go (default: a temporary directory)")
    args = p.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="serving_bench_"))
    model_dir = Path(args.model_dir) if args.model_dir else train_student(work / "student", args.train_steps, args.max_length)
    corpus_dir = ensure_builtin_corpus(args.builtin_dir)
    model = BertForMaskedLM.from_pretrained(model_dir).eval()
    corpus = CellCorpus(corpus_dir, vocab_size=model.config.vocab_size, max_length=args.max_length)
    vocab = Vocabulary.load(corpus_dir / "vocab.txt")
    _, heldout = split_indices(len(corpus), 0.02, 42)  # training's default held-out cells (l0_sanity)
    heldout = heldout[: args.cells] if args.cells else heldout
    data = batches([corpus[int(i)] for i in heldout], MLMCollator(vocab, seed=1234), args.max_tokens)

    report = export_model(model_dir, work / "onnx")
    torch.set_num_threads(args.threads)
    fp32_sess, int8_sess = session(Path(report.fp32_path), args.threads), session(Path(report.int8_path), args.threads)

    def torch_forward(batch: dict) -> np.ndarray:
        with torch.no_grad():
            return model(batch["input_ids"], batch["attention_mask"]).logits.numpy()

    engines = [("pytorch fp32", torch_forward, model_dir / "model.safetensors"),
               ("onnx fp32", lambda b: run_session(fp32_sess, b["input_ids"], b["attention_mask"]), Path(report.fp32_path)),
               ("onnx int8", lambda b: run_session(int8_sess, b["input_ids"], b["attention_mask"]), Path(report.int8_path))]
    results = [run_engine(name, fn, data) | {"mb": path.stat().st_size / 1e6} for name, fn, path in engines]

    n_cells = sum(len(b["input_ids"]) for b in data)
    n_masked = sum(int((b["labels"] != -100).sum()) for b in data)
    load = os.getloadavg()
    print(f"\n{model_dir}: {n_cells} held-out cells (<= {args.max_length} genes), {n_masked} masked genes, "
          f"{args.threads} threads, load average {load[0]:.1f} on {os.cpu_count()} cores; full logits [B,S,V] out")
    print(f"{'engine':<14}{'cells/s':>9}{'size MB':>9}{'acc':>8}{'ppl':>9}{'agree fp32':>12}")
    reference = results[0]["preds"]
    for r in results:
        agree = float((r["preds"] == reference).mean())
        print(f"{r['name']:<14}{r['cells_s']:>9.1f}{r['mb']:>9.2f}{r['acc']:>8.4f}{r['ppl']:>9.2f}{agree:>12.4f}")
    print(f"INT8 accuracy loss vs ONNX fp32: {results[1]['acc'] - results[2]['acc']:+.4f} "
          f"(perplexity {results[2]['ppl'] / results[1]['ppl'] - 1:+.2%}); max |ONNX - PyTorch| {report.max_abs_diff:.1e}")


if __name__ == "__main__":
    main()
