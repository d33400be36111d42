"""Time and memory of one forward+backward of the 10m model: ours (masked-only head) vs stock transformers (full logits).

Run: python -m benchmarks.model_forward_backward [--repeats 7] [--cells 8] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
import yaml

from modeling_bert_te import BertForMaskedLM, BertTEConfig

ROOT = Path(__file__).resolve().parents[1]

CONFIG = ROOT / "hydra_config" / "model" / "10m.yaml"
Step = Callable[[torch.nn.Module, dict], None]  # forward + backward of one model on one batch


def make_batch(cells: int, seq_len: int, vocab: int, mask_prob: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (cells, seq_len), generator=g)
    attention_mask = torch.ones_like(ids)
    # Cells of mixed length padded to seq_len, as a real batch would be.
    lengths = torch.linspace(seq_len // 2, seq_len, cells).long()
    attention_mask[torch.arange(seq_len)[None, :] >= lengths[:, None]] = 0
    ids = ids * attention_mask
    chosen = (torch.rand(ids.shape, generator=g) < mask_prob) & attention_mask.bool()
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    return {
        "input_ids": torch.where(chosen, torch.ones_like(ids), ids),
        "attention_mask": attention_mask,
        "labels": labels,
    }


def step_ours(model: BertForMaskedLM, batch: dict[str, torch.Tensor]) -> None:
    model(batch["input_ids"], batch["attention_mask"], batch["labels"]).loss.backward()


def step_stock(model: transformers.BertForMaskedLM, batch: dict[str, torch.Tensor]) -> None:
    model(**batch).loss.backward()


def time_steps(
    models: dict[str, tuple[torch.nn.Module, Step]], batch: dict, repeats: int
) -> dict[str, list[float]]:
    """Seconds per forward+backward, the models interleaved repeat by repeat so machine load hits both alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for model, step in models.values():  # warm-up: kernel selection, lazy allocations
        model.train()
        step(model, batch)
        model.zero_grad(set_to_none=True)
    for _ in range(repeats):
        for name, (model, step) in models.items():
            gc.collect()
            start = time.perf_counter()
            step(model, batch)
            times[name].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    return times


def saved_activation_bytes(model: torch.nn.Module, step: Step, batch: dict) -> int:
    """Bytes of tensors autograd keeps from forward for backward (weights excluded, shared storage counted once):
    the activation memory held at the end of forward, which is what sets the peak of a training step."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(model, batch)
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def peak_rss_mib() -> float:
    """Process peak resident set size so far (Linux reports KiB); it only ever grows."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cells", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--mask-prob", type=float, default=0.15)
    args = parser.parse_args()

    fields = yaml.safe_load(CONFIG.read_text())
    torch.manual_seed(0)
    ours = BertForMaskedLM(BertTEConfig(**fields))
    stock_fields = {k: v for k, v in fields.items() if k != "use_te_layers"}
    stock = transformers.BertForMaskedLM(transformers.BertConfig(**stock_fields, attn_implementation="sdpa"))
    stock.load_state_dict(ours.stock_state_dict(), strict=False)
    batch = make_batch(args.cells, args.seq_len, fields["vocab_size"], args.mask_prob)
    n_masked = int((batch["labels"] != -100).sum())
    print(
        f"10m config, {args.cells} cells padded to {args.seq_len} tokens, {n_masked} masked tokens, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU, dropout on (train mode)"
    )
    models = {
        "ours (masked-only head)": (ours, step_ours),
        "stock HF (sdpa, full logits)": (stock, step_stock),
    }
    # Peak RSS first, ours before stock: the high-water mark only grows, so stock's step can only raise it.
    rss_base = peak_rss_mib()
    step_ours(ours, batch)
    rss_ours = peak_rss_mib()
    step_stock(stock, batch)
    rss_stock = peak_rss_mib()
    for model in (ours, stock):
        model.zero_grad(set_to_none=True)
    times = time_steps(models, batch, args.repeats)
    saved = {name: saved_activation_bytes(model, step, batch) for name, (model, step) in models.items()}
    for name, values in times.items():
        print(
            f"{name:>28}: median {statistics.median(values) * 1e3:8.1f} ms (min {min(values) * 1e3:.1f}, "
            f"max {max(values) * 1e3:.1f}, n={len(values)}); saved for backward {saved[name] / 2**20:7.1f} MiB"
        )
    ours_name, stock_name = list(models)
    ratio = statistics.median(times[ours_name]) / statistics.median(times[stock_name])
    print(
        f"time ratio ours/stock (medians): {ratio:.2f}x; saved-activation ratio: {saved[ours_name] / saved[stock_name]:.2f}x"
    )
    print(
        f"process peak RSS: {rss_base:.0f} MiB before any step, {rss_ours:.0f} MiB after ours, "
        f"{rss_stock:.0f} MiB after stock (stock's step raised the high-water mark by {rss_stock - rss_ours:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
