"""Small serving on CPU: cells/s and file size as fp32 PyTorch, ONNX fp32 and ONNX INT8 (dynamic) of a student
(INT8 loss on held-out masked-LM cells, fixed masks) and of a fine-tuned classifier (INT8 loss on finetune's split).

Run: python -m benchmarks.serving MODEL_DIR [--classifier DIR] [--max-length 512] [--cells 80] [--threads 2]
(without MODEL_DIR it trains a 2m student with `train.py --config-name l0_sanity` first; without --classifier it
fine-tunes one with `finetune.py --config-name l0_sanity`; --no-classifier skips that part).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dataset.builtin_corpus import ensure_builtin_corpus
from dataset.collator import MLMCollator
from dataset.corpus import CellCorpus
from dataset.split import split_indices
from dataset.vocab import Vocabulary
from finetune import cell_max_length
from finetuning.data import build_classification_data
from finetuning.task import classification_metrics
from model.classifier import BertForCellClassification, ClassifierOutput
from modeling_bert_te import BertForMaskedLM, BertTEConfig
from serving.export_onnx import ExportReport, export_model, run_session, session
from training.builders import fixed_eval_batches
from training.config import RunConfig, parse_config
from training.distributed import DistributedContext

ROOT = Path(__file__).resolve().parents[1]


def run_quietly(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def train_student(out: Path, steps: int, max_length: int) -> Path:
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--config-name",
        "l0_sanity",
        "model=2m",
        f"model.max_position_embeddings={max_length}",
        f"output_dir={out}",
        f"training.num_train_steps={steps}",
        "logging.progress_bar=false",
        "logging.plot=false",
        f"hydra.run.dir={out}/hydra",
    ]
    run_quietly(cmd)
    return out / "final_model"


def train_classifier(out: Path) -> Path:
    """finetune.py's sanity run (pretrains its tiny model first); Hydra's run folder lands beside final_model."""
    run_quietly(
        [
            sys.executable,
            str(ROOT / "finetune.py"),
            "--config-name",
            "l0_sanity",
            f"output_dir={out}",
            "logging.progress_bar=false",
            "logging.plot=false",
            f"hydra.run.dir={out}/hydra",
        ]
    )
    return out / "final_model"


def batches(cells: list[np.ndarray], collator: MLMCollator, max_tokens: int) -> list[dict]:
    """Length-sorted batches under a token budget (as the training sampler builds them), fixed masks."""
    order = np.argsort([len(c) for c in cells], kind="stable")
    out, current = [], []
    for i in order:
        longest = max([len(cells[j]) for j in current] + [len(cells[i])])
        if current and longest * (len(current) + 1) > max_tokens:
            out.append(collator.fixed_masks([cells[j] for j in current], current))
            current = []
        current.append(i)
    out.append(collator.fixed_masks([cells[j] for j in current], current))
    return out


def masked_stats(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log-prob of the true gene, predicted gene) at each masked position."""
    keep = labels != -100
    rows = torch.from_numpy(np.ascontiguousarray(logits[keep])).float()
    log_probs = rows.log_softmax(-1)
    true = torch.from_numpy(labels[keep])
    return log_probs.gather(1, true[:, None]).squeeze(1).numpy(), rows.argmax(-1).numpy()


def cells_per_s(forward: Callable[[dict], object], data: list[dict]) -> float:
    """Back-to-back forward calls only, as a server makes them. Scoring between calls (torch ops) would leave
    PyTorch's and onnxruntime's thread pools contending for the cores: on 2 cores that halved onnxruntime's rate."""
    forward(data[0])  # warm-up: allocators and onnxruntime's first-run graph work
    start = time.perf_counter()
    for batch in data:
        forward(batch)
    return sum(len(b["input_ids"]) for b in data) / (time.perf_counter() - start)


def masked_lm_quality(name: str, forward: Callable[[dict], object], data: list[dict]) -> dict:
    """Held-out masked-LM accuracy, perplexity and predictions at the fixed masks (not timed)."""
    true_lp, preds, labels = [], [], []
    for batch in data:
        lp, pred = masked_stats(forward(batch), batch["labels"].numpy())
        true_lp.append(lp)
        preds.append(pred)
        labels.append(batch["labels"].numpy()[batch["labels"].numpy() != -100])
    true_lp, preds, labels = np.concatenate(true_lp), np.concatenate(preds), np.concatenate(labels)
    return {
        "name": name,
        "acc": float((preds == labels).mean()),
        "ppl": float(np.exp(-true_lp.mean())),
        "preds": preds,
    }


def finetune_run(classifier_dir: Path, overrides: list[str]) -> RunConfig:
    """The fine-tuning run's config, read from its Hydra run folder beside the export when there (the exact split),
    else finetune's l0_sanity; `overrides` (key=value) go on top."""
    saved = classifier_dir.parent / "hydra" / ".hydra" / "config.yaml"
    if saved.is_file():
        from omegaconf import OmegaConf

        return parse_config(OmegaConf.merge(OmegaConf.load(saved), OmegaConf.from_dotlist(overrides)))
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "hydra_config" / "finetune"), version_base=None):
        return parse_config(compose("l0_sanity", overrides=overrides))


def classifier_heldout(classifier_dir: Path, run: RunConfig) -> tuple[list[dict], int]:
    """finetune's held-out batches (its stratified split, its evenly spaced eval cells) and the class count."""
    source = BertTEConfig.from_model_dir(classifier_dir)
    ctx = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    data, labels = build_classification_data(
        run, ctx, vocab_size=source.vocab_size, max_length=cell_max_length(run, source)
    )
    if len(labels.names) != source.num_labels:
        raise SystemExit(
            f"{classifier_dir} has {source.num_labels} classes but column '{run.finetune.label_column}' "
            f"has {len(labels.names)}; pass the run's overrides with --finetune-override"
        )
    return fixed_eval_batches(data), len(labels.names)


class OnnxClassifier(torch.nn.Module):
    """An onnxruntime session behind the classifier's call, so finetune's own metrics score it unchanged."""

    def __init__(self, sess) -> None:
        super().__init__()
        self.sess = sess

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> ClassifierOutput:
        return ClassifierOutput(logits=torch.from_numpy(run_session(self.sess, input_ids, attention_mask)))


def score_classifier(model: torch.nn.Module, batches: list[dict], n_labels: int) -> dict:
    """Held-out loss, accuracy and macro-F1 (finetune's classification_metrics; not timed)."""
    return classification_metrics(model, batches, n_labels, torch.device("cpu"))


def classifier_forward(model: torch.nn.Module) -> Callable[[dict], torch.Tensor]:
    def forward(batch: dict) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    return forward


def interleaved_cells_s(forwards: list, data: list[dict], repeats: int) -> list[float]:
    """Each engine's median cells/s over `repeats` rounds, the engines taking turns within a round, so a change
    of machine load hits them all alike."""
    rounds = [[cells_per_s(forward, data) for forward in forwards] for _ in range(repeats)]
    return [float(np.median([r[i] for r in rounds])) for i in range(len(forwards))]


def engine_files(model_dir: Path, report: ExportReport) -> list[tuple[str, Path]]:
    return [
        ("pytorch fp32", model_dir / "model.safetensors"),
        ("onnx fp32", Path(report.fp32_path)),
        ("onnx int8", Path(report.int8_path)),
    ]


def size_note(report: ExportReport) -> str:
    return (
        f"ONNX fp32 {report.fp32_bytes / 1e6:.2f} MB with repeated weights stored once "
        f"({report.fp32_bytes_unshared / 1e6:.2f} MB as exported); max |ONNX - PyTorch| {report.max_abs_diff:.1e}"
    )


def masked_lm_section(args: argparse.Namespace, work: Path) -> None:
    model_dir = (
        Path(args.model_dir)
        if args.model_dir
        else train_student(work / "student", args.train_steps, args.max_length)
    )
    corpus_dir = ensure_builtin_corpus(args.builtin_dir)
    model = BertForMaskedLM.from_pretrained(model_dir).eval()
    corpus = CellCorpus(corpus_dir, vocab_size=model.config.vocab_size, max_length=args.max_length)
    vocab = Vocabulary.load(corpus_dir / "vocab.txt")
    _, heldout = split_indices(len(corpus), 0.02, 42)  # training's default held-out cells (l0_sanity)
    heldout = heldout[: args.cells] if args.cells else heldout
    data = batches([corpus[int(i)] for i in heldout], MLMCollator(vocab, seed=1234), args.max_tokens)

    report = export_model(model_dir, work / "onnx")
    fp32_sess, int8_sess = (
        session(Path(report.fp32_path), args.threads),
        session(Path(report.int8_path), args.threads),
    )

    def torch_forward(batch: dict) -> np.ndarray:
        with torch.no_grad():
            return model(batch["input_ids"], batch["attention_mask"]).logits.numpy()

    forwards = [
        torch_forward,
        lambda b: run_session(fp32_sess, b["input_ids"], b["attention_mask"]),
        lambda b: run_session(int8_sess, b["input_ids"], b["attention_mask"]),
    ]
    files = engine_files(model_dir, report)
    results = [
        masked_lm_quality(name, fn, data) | {"mb": path.stat().st_size / 1e6, "cells_s": cells_s}
        for (name, path), fn, cells_s in zip(
            files, forwards, interleaved_cells_s(forwards, data, args.repeats), strict=True
        )
    ]

    n_cells = sum(len(b["input_ids"]) for b in data)
    n_masked = sum(int((b["labels"] != -100).sum()) for b in data)
    print(
        f"\nmasked-LM {model_dir}: {n_cells} held-out cells (<= {args.max_length} genes), {n_masked} masked genes; "
        "full logits [B,S,V] out"
    )
    print(f"{'engine':<14}{'cells/s':>9}{'size MB':>9}{'acc':>8}{'ppl':>9}{'agree fp32':>12}")
    reference = results[0]["preds"]
    for r in results:
        agree = float((r["preds"] == reference).mean())
        print(
            f"{r['name']:<14}{r['cells_s']:>9.1f}{r['mb']:>9.2f}{r['acc']:>8.4f}{r['ppl']:>9.2f}{agree:>12.4f}"
        )
    print(
        f"INT8 masked-LM accuracy loss vs ONNX fp32: {results[1]['acc'] - results[2]['acc']:+.4f} "
        f"(perplexity {results[2]['ppl'] / results[1]['ppl'] - 1:+.2%}); {size_note(report)}"
    )


def classifier_section(args: argparse.Namespace, work: Path) -> None:
    classifier_dir = Path(args.classifier) if args.classifier else train_classifier(work / "classifier")
    data, n_labels = classifier_heldout(classifier_dir, finetune_run(classifier_dir, args.finetune_override))
    report = export_model(classifier_dir, work / "classifier_onnx")
    models = [
        BertForCellClassification.from_pretrained(classifier_dir).eval(),
        OnnxClassifier(session(Path(report.fp32_path), args.threads)),
        OnnxClassifier(session(Path(report.int8_path), args.threads)),
    ]
    speeds = interleaved_cells_s([classifier_forward(model) for model in models], data, args.repeats)
    results = [
        score_classifier(model, data, n_labels)
        | {"name": name, "mb": path.stat().st_size / 1e6, "cells_s": cells_s}
        for model, (name, path), cells_s in zip(
            models, engine_files(classifier_dir, report), speeds, strict=True
        )
    ]

    print(
        f"\nclassifier {classifier_dir}: {int(results[0]['cells'])} held-out cells of finetune's stratified split, "
        f"{n_labels} classes; logits [B,{n_labels}] out"
    )
    print(f"{'engine':<14}{'cells/s':>9}{'size MB':>9}{'acc':>8}{'macro-F1':>10}{'loss':>8}")
    for r in results:
        print(
            f"{r['name']:<14}{r['cells_s']:>9.1f}{r['mb']:>9.2f}{r['accuracy']:>8.4f}{r['macro_f1']:>10.4f}"
            f"{r['loss']:>8.4f}"
        )
    print(
        f"INT8 classifier loss vs ONNX fp32: accuracy {results[1]['accuracy'] - results[2]['accuracy']:+.4f}, "
        f"macro-F1 {results[1]['macro_f1'] - results[2]['macro_f1']:+.4f}; {size_note(report)}"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "model_dir",
        nargs="?",
        default=None,
        metavar="MODEL_DIR",
        help="student directory (default: train a 2m student on the built-in corpus first)",
    )
    p.add_argument("--train-steps", type=int, default=150, help="steps of that student, when none is given")
    p.add_argument(
        "--classifier",
        default=None,
        metavar="DIR",
        help="finetune.py's final_model (default: fine-tune one with finetune.py --config-name l0_sanity)",
    )
    p.add_argument("--no-classifier", action="store_true", help="skip the classifier part")
    p.add_argument(
        "--finetune-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config the classifier was fine-tuned with, where its run folder (DIR/../hydra) is gone: "
        "data.*, seed, finetune.label_column, eval.max_cells pick its held-out cells",
    )
    p.add_argument("--builtin-dir", default=str(ROOT / "outputs" / "builtin_corpus"))
    p.add_argument(
        "--max-length", type=int, default=512, help="masked-LM cells are truncated to this many genes"
    )
    p.add_argument(
        "--cells", type=int, default=80, help="masked-LM held-out cells to serve (0 = all held-out cells)"
    )
    p.add_argument("--max-tokens", type=int, default=4096, help="token budget of a masked-LM batch")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of PyTorch and onnxruntime")
    p.add_argument(
        "--repeats", type=int, default=3, help="interleaved timing rounds; cells/s is their median"
    )
    p.add_argument("--work", default=None, help="where the ONNX files go (default: a temporary directory)")
    args = p.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="serving_bench_"))
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(
        f"{args.threads} threads, median cells/s of {args.repeats} interleaved rounds of forward calls, load average "
        f"{load[0]:.1f} on {os.cpu_count()} cores",
        flush=True,
    )
    masked_lm_section(args, work)
    if not args.no_classifier:
        classifier_section(args, work)


if __name__ == "__main__":
    main()
