"""Where the time of one pretraining step goes on a GPU: torch.profiler's kernel table for one of our modes.

Run: python -m benchmarks.profile_step [--model 106m] [--mode "fp8 +packing +compile"] [--steps 5] [--top 30]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import gpu_throughput as bench
from training.config import TrainingConfig
from training.optim import build_optimizer
from training.run import masked_lm_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="106m")
    parser.add_argument("--mode", default="fp8 +packing +compile", choices=list(bench.OUR_MODES))
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    opts = bench.OUR_MODES[args.mode]
    cells = bench.load_cells(str(bench.ROOT / "outputs" / "builtin_corpus"), 2048)
    batches = bench.budget_batches(cells, args.warmup + args.steps, args.max_tokens, opts["packed"])
    model = bench.ours_model(bench.model_config(args.model, 2048), opts, tokens=args.max_tokens)
    step = bench.recipe_step(
        model,
        masked_lm_loss,
        build_optimizer(model, TrainingConfig(), bench.GPU),
        bench.mode_autocast(opts, "delayed"),
    )
    for batch in batches[: args.warmup]:
        step(batch)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for batch in batches[args.warmup :]:
            step(batch)
        torch.cuda.synchronize()
    events = prof.key_averages()
    cuda_total = sum(e.self_device_time_total for e in events) / 1e3 / args.steps
    cpu_total = prof.profiler.self_cpu_time_total / 1e3 / args.steps
    print(
        f"{args.model} {args.mode}: {cuda_total:.1f} ms GPU kernel time, {cpu_total:.1f} ms CPU op time per step"
    )
    print(events.table(sort_by="self_device_time_total", row_limit=args.top, max_name_column_width=70))


if __name__ == "__main__":
    main()
