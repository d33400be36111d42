"""Time of one distillation step (10m-shaped teacher, 4m student) on CPU: the recipe's vs a naive full-logits one.

Run: python -m benchmarks.distill_step [--max-tokens 8192] [--max-length 2048] [--batches 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dataset.builtin_corpus import ensure_builtin_corpus
from dataset.collator import MLMCollator
from dataset.corpus import CellCorpus
from dataset.loader import CellBatchLoader
from dataset.sampler import TokenBudgetSampler
from dataset.vocab import Vocabulary
from distillation.task import DistillationLoss, StudentWithProjections, default_layer_map
from modeling_bert_te import BertForMaskedLM, BertTEConfig
from training.builders import model_config_by_name
from training.config import DistillConfig, TrainingConfig
from training.optim import build_optimizer
from training.step import train_step

ROOT = Path(__file__).resolve().parents[1]

CPU = torch.device("cpu")


def model_config(name: str, max_length: int) -> BertTEConfig:
    return BertTEConfig(**{**model_config_by_name(name), "max_position_embeddings": max_length})


def corpus_batches(n: int, max_tokens: int, max_length: int, builtin_dir: str) -> list[dict]:
    """The first `n` training batches of the built-in corpus's shuffled plan: its real length mix."""
    path = ensure_builtin_corpus(builtin_dir)
    vocab = Vocabulary.load(path / "vocab.txt")
    corpus = CellCorpus(path, vocab_size=vocab.size, max_length=max_length)
    sampler = TokenBudgetSampler.every_cell(corpus.lengths, max_tokens)
    loader = CellBatchLoader(corpus, sampler, MLMCollator(vocab, seed=0), rank=0)
    return [next(loader) for _ in range(n)]


def ours_step(
    model: torch.nn.Module, loss_fn: DistillationLoss, optimizer: torch.optim.Optimizer, batch: dict
) -> None:
    """The recipe's step: training/step.py train_step with DistillationLoss, then the optimizer."""
    train_step(
        model,
        loss_fn,
        optimizer,
        [batch],
        device=CPU,
        world_size=1,
        grad_clip=1.0,
        autocast=contextlib.nullcontext,
    )
    optimizer.step()


def naive_step(
    student: BertForMaskedLM,
    teacher: BertForMaskedLM,
    optimizer: torch.optim.Optimizer,
    batch: dict,
    cfg: DistillConfig,
) -> None:
    """Full-vocabulary logits of both models at every position; KL over every real token plus masked CE."""
    optimizer.zero_grad(set_to_none=True)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        t_logits = teacher(ids, mask, labels, full_logits=True).logits
    out = student(ids, mask, labels, full_logits=True)
    real = mask.bool()
    t = cfg.temperature
    kl = (
        F.kl_div(
            F.log_softmax(out.logits[real] / t, -1),
            F.log_softmax(t_logits[real] / t, -1),
            log_target=True,
            reduction="batchmean",
        )
        * t**2
    )
    ce = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    (cfg.kd_weight * kl + cfg.mlm_weight * ce).backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="10m", help="hydra_config/model/<name> (random weights)")
    parser.add_argument("--student", default="4m")
    parser.add_argument(
        "--max-tokens", type=int, default=8192, help="token budget per step (padding included)"
    )
    parser.add_argument("--max-length", type=int, default=2048, help="cells truncated to this many tokens")
    parser.add_argument("--batches", type=int, default=4, help="distinct corpus batches per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--builtin-dir", default=str(ROOT / "outputs" / "builtin_corpus"))
    args = parser.parse_args()

    torch.manual_seed(0)
    t_config, s_config = (
        model_config(args.teacher, args.max_length),
        model_config(args.student, args.max_length),
    )
    teacher = (
        BertForMaskedLM(t_config).requires_grad_(False).eval()
    )  # frozen, as distillation/teacher.py loads it
    student = BertForMaskedLM(s_config)
    naive_student = copy.deepcopy(student)
    cfg = DistillConfig()  # recipe defaults: T=2, kd 1.0, mlm 0.5, no hidden/relation terms
    ours = StudentWithProjections(student, t_config.hidden_size, 0)
    loss_fn = DistillationLoss(
        teacher,
        cfg,
        default_layer_map(s_config.num_hidden_layers, t_config.num_hidden_layers),
        s_config.num_attention_heads,
    )
    ours_opt = build_optimizer(ours, TrainingConfig(), CPU)
    naive_opt = build_optimizer(naive_student, TrainingConfig(), CPU)
    batches = corpus_batches(args.batches, args.max_tokens, args.max_length, args.builtin_dir)

    steps = {
        "ours (masked-only heads)": lambda b: ours_step(ours, loss_fn, ours_opt, b),
        "naive (full logits)": lambda b: naive_step(naive_student, teacher, naive_opt, b, cfg),
    }
    print(
        f"teacher {args.teacher} ({sum(p.numel() for p in teacher.parameters()):,} params), student {args.student} "
        f"({sum(p.numel() for p in student.parameters()):,}); built-in corpus, max_tokens {args.max_tokens}, "
        f"cells <= {args.max_length} tokens; torch {torch.__version__}, {torch.get_num_threads()} threads, fp32"
    )
    for i, b in enumerate(batches):
        print(
            f"  batch {i}: {b['input_ids'].shape[0]} cells x {b['input_ids'].shape[1]} padded, "
            f"{int(b['attention_mask'].sum())} real tokens, {int((b['labels'] != -100).sum())} masked"
        )
    for step in steps.values():  # warm-up on the smallest batch
        step(min(batches, key=lambda b: b["input_ids"].numel()))
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.repeats):
        names = list(steps) if r % 2 == 0 else list(reversed(steps))
        for name in names:
            start = time.perf_counter()
            for batch in batches:
                steps[name](batch)
            times[name].append((time.perf_counter() - start) / len(batches))
    print(f"{'step':<28}{'median s/step':>15}{'min':>8}{'max':>8}")
    for name, values in times.items():
        print(f"{name:<28}{statistics.median(values):>15.3f}{min(values):>8.3f}{max(values):>8.3f}")
    ratio = statistics.median(times[list(steps)[0]]) / statistics.median(times[list(steps)[1]])
    print(
        f"ratio ours/naive (medians): {ratio:.2f}x ({'met' if ratio <= 0.5 else 'NOT met'}: target <= 0.5x)"
    )


if __name__ == "__main__":
    main()
