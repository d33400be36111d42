"""FP8 against bf16 on a stack of a few encoder layers of one model's shape (e.g. `4b`, whose full model does not fit
a short GPU slice): forward + backward time of packed cells, for each torchao scaling, with the automatic layer
filter and with every layer in FP8.

Run: python -m benchmarks.fp8_layers [--model 4b] [--layers 4] [--tokens 16384] [--json out.json] [--smoke-cpu]
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch
from torch import nn

from model.attention_layout import packed_layout
from modeling_bert_te import BertLayer, BertTEConfig
from training.builders import model_config_by_name
from training.float8 import apply_float8
from training.throughput import peak_flops

ROOT = Path(__file__).resolve().parents[1]

# (label, scaling, layer choice); None = bf16
VARIANTS = [
    ("bf16", None, None),
    ("fp8 tensorwise auto", "tensorwise", "auto"),
    ("fp8 tensorwise all", "tensorwise", "all"),
    ("fp8 rowwise auto", "rowwise", "auto"),
    ("fp8 rowwise all", "rowwise", "all"),
]


class LayerStack(nn.Module):
    """`n` encoder layers under the names FP8's filter looks for (`encoder.layer.N`)."""

    def __init__(self, config: BertTEConfig, n: int) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(config) for _ in range(n))

    def forward(self, x: torch.Tensor, layout) -> torch.Tensor:
        for layer in self.encoder.layer:
            x = layer(x, layout)[0]
        return x


def stack_config(name: str, smoke: bool) -> BertTEConfig:
    fields = model_config_by_name(name)
    if smoke:
        fields = {**fields, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
    return BertTEConfig(**{**fields, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})


def time_variant(
    config: BertTEConfig,
    args: argparse.Namespace,
    device: torch.device,
    scaling: str | None,
    layers: str | None,
) -> dict:
    torch.manual_seed(0)
    stack = LayerStack(config, args.layers)
    converted = apply_float8(stack, tokens=args.tokens, scaling=scaling, layers=layers) if scaling else []
    stack.to(device)
    if args.compile:
        for layer in stack.encoder.layer:
            layer.compile()  # torchao's casts fuse into the surrounding kernels only when compiled
    n_cells = args.tokens // args.cell_length
    cu = torch.arange(0, n_cells + 1, dtype=torch.int32) * args.cell_length
    layout, _ = packed_layout(cu, args.cell_length, args.tokens, device)
    x = torch.randn(1, args.tokens, config.hidden_size, device=device, requires_grad=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = torch.autocast(device_type=device.type, dtype=dtype, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            out = stack(x, layout)
        out.float().square().mean().backward()

    for _ in range(args.warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    h, f = config.hidden_size, config.intermediate_size
    flops = 3 * 2 * args.tokens * args.layers * (4 * h * h + 2 * h * f)  # linears only, forward + backward
    peak = peak_flops(device) if device.type == "cuda" else None
    return {
        "ms": seconds * 1e3,
        "fp8_layers": len(converted),
        "linear_mfu": flops / seconds / peak if peak else None,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="4b", help="hydra_config/model/<name> whose layer shape is timed")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument(
        "--tokens", type=int, default=16384, help="packed tokens per micro-batch (4b.yaml: 16384)"
    )
    parser.add_argument("--cell-length", type=int, default=512, help="length of each packed cell")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument(
        "--variants",
        default=",".join(label for label, _, _ in VARIANTS),
        help="comma list of the variants to time (bf16 is the reference and always runs)",
    )
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--smoke-cpu",
        action="store_true",
        help="check the script on a CPU: tiny widths and tokens, one step, no compile (figures meaningless)",
    )
    args = parser.parse_args()
    if args.smoke_cpu:
        args.layers, args.tokens, args.cell_length, args.steps, args.warmup, args.compile = (
            2,
            256,
            64,
            1,
            1,
            False,
        )
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit(
            "fp8_layers.py measures GPU GEMMs; no CUDA device is visible (use --smoke-cpu to check it)"
        )
    config = stack_config(args.model, args.smoke_cpu)
    print(
        f"{args.layers} x {args.model} layers (hidden {config.hidden_size}, intermediate {config.intermediate_size}), "
        f"{args.tokens} tokens in cells of {args.cell_length}, compile={args.compile}, {device}"
    )
    wanted = {"bf16", *args.variants.split(",")}
    unknown = wanted - {label for label, _, _ in VARIANTS}
    if unknown:
        parser.error(
            f"--variants: unknown {sorted(unknown)}; choose from {', '.join(v[0] for v in VARIANTS)}"
        )
    results = {}
    for label, scaling, layers in (v for v in VARIANTS if v[0] in wanted):
        try:
            results[label] = time_variant(config, args, device, scaling, layers)
        except Exception as error:  # noqa: BLE001 - a benchmark keeps measuring the other variants
            traceback.print_exc()
            results[label] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = results["bf16"].get("ms")
    print(f"{'variant':<24}{'ms/step':>10}{'vs bf16':>9}{'FP8 layers':>12}")
    for label, r in results.items():
        if "error" in r:
            print(f"{label:<24}  FAILED {r['error']}")
            continue
        r["speedup"] = base / r["ms"] if base else None
        print(f"{label:<24}{r['ms']:>10.2f}{r['speedup']:>8.2f}x{r['fp8_layers']:>12}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "device": str(device), "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
