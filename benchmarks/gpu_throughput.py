"""One GPU, one process: real (unpadded) tokens/s, step time, peak memory and MFU of the usual recipe's baseline
and of ours in each mode (packing, compile, CUDA graphs, FP8), for 10m pretraining, 10m -> 4m distillation and 106m
bf16 vs FP8, on the built-in corpus.

Run: python -m benchmarks.gpu_throughput [--steps 30] [--warmup 8] [--parts pretrain,distill,106m] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from common.device import move_batch
from dataset.builtin_corpus import ensure_builtin_corpus
from dataset.collator import MLMCollator
from dataset.corpus import CellCorpus
from dataset.loader import CellBatchLoader
from dataset.sampler import TokenBudgetSampler
from dataset.static_shape import StaticShape
from dataset.vocab import Vocabulary
from distillation.task import DistillationLoss, StudentWithProjections, default_layer_map
from modeling_bert_te import BertForMaskedLM, BertTEConfig
from training.builders import model_config_by_name
from training.config import DistillConfig, TrainingConfig, fp8_alignment
from training.float8 import align_packed_tokens, apply_float8, nest_contexts, te_fp8_autocast
from training.optim import build_optimizer
from training.parallelize import capture_cuda_graphs, compile_layers
from training.run import masked_lm_loss
from training.step import mark_graph_step, train_step
from training.throughput import peak_flops, peak_memory_mb, train_flops_per_token

ROOT = Path(__file__).resolve().parents[1]

GPU = torch.device("cuda")  # `--smoke-cpu` swaps in the CPU to check the script itself on a tiny run
BF16_AUTOCAST = functools.partial(torch.autocast, device_type="cuda", dtype=torch.bfloat16)
TEACHER_DTYPE = torch.bfloat16  # the frozen teacher's weights, as distill.py keeps them on GPUs


@dataclass
class Result:
    part: str
    mode: str
    tokens_per_s: float
    step_ms: float
    peak_gib: float
    mfu: float | None
    teacher_share: float | None = None
    note: str = ""


def model_config(name: str, max_length: int) -> BertTEConfig:
    return BertTEConfig(**{**model_config_by_name(name), "max_position_embeddings": max_length})


# ---------------------------------------------------------------------------------------------------------- data
@dataclass
class Cells:
    corpus: CellCorpus
    vocab: Vocabulary
    indices: np.ndarray


def load_cells(builtin_dir: str, max_length: int) -> Cells:
    path = ensure_builtin_corpus(builtin_dir)
    vocab = Vocabulary.load(path / "vocab.txt")
    corpus = CellCorpus(path, vocab_size=vocab.size, max_length=max_length)
    return Cells(corpus, vocab, np.arange(len(corpus)))


def baseline_batches(cells: Cells, n: int, batch_size: int, seed: int = 0) -> list[dict]:
    """The usual recipe's batches: `batch_size` random cells padded to the longest of them."""
    order = np.random.default_rng(seed).permutation(cells.indices)
    collator = MLMCollator(cells.vocab, seed=seed)
    return [
        pin(
            collator(
                cells.corpus.get_many(order[i * batch_size : (i + 1) * batch_size]),
                epoch=0,
                batch_index=i,
                rank=0,
            )
        )
        for i in range(n)
    ]


STATIC_MAX_CELLS = (
    1024  # data.max_cells of the static-shape (CUDA graph) modes: more than any 32k batch holds
)


def budget_batches(
    cells: Cells,
    n: int,
    max_tokens: int,
    packed: bool,
    seed: int = 0,
    static: bool = False,
) -> list[dict]:
    """The recipe's batches: length-sorted token-budget micro-batches (padded, or packed with cu_seqlens; with
    `static`, in training.cuda_graphs's fixed shapes)."""
    max_cells = STATIC_MAX_CELLS if static else None
    sampler = TokenBudgetSampler(
        cells.corpus.lengths,
        cells.indices,
        max_tokens=max_tokens,
        max_cells=max_cells,
        rank=0,
        world_size=1,
        seed=seed,
    )
    shape = (
        StaticShape.for_budget(max_tokens, STATIC_MAX_CELLS, int(cells.corpus.lengths.max()))
        if static
        else None
    )
    collator = MLMCollator(cells.vocab, packed=packed, static_shape=shape, seed=seed)
    loader = CellBatchLoader(cells.corpus, sampler, collator, rank=0)
    return [pin(next(loader)) for _ in range(n)]


def pin(batch: dict) -> dict:
    if GPU.type != "cuda":
        return batch
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def synchronize() -> None:
    if GPU.type == "cuda":
        torch.cuda.synchronize()


def real_tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum())


def real_cells(batch: dict) -> int:
    """Cells of the corpus in a batch: not the filler or empty cells of a static-shape one."""
    if "cu_seqlens" not in batch:
        return batch["input_ids"].shape[0]
    cu = batch["cu_seqlens"]
    return int(((cu[1:] > cu[:-1]) & (cu[1:] <= real_tokens(batch))).sum())


def mean_cell_length(batches: list[dict]) -> float:
    return sum(real_tokens(b) for b in batches) / sum(real_cells(b) for b in batches)


# ---------------------------------------------------------------------------------------------------------- timing
def time_steps(
    step: Callable[[dict], None], batches: list[dict], steps: int, warmup: int
) -> tuple[float, float, float]:
    """Mean seconds per step over `steps` steps after `warmup`, real tokens/s, peak GiB of GPU memory."""
    for i in range(warmup):
        step(batches[i % len(batches)])
    synchronize()
    if GPU.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens = 0
    start = time.perf_counter()
    for i in range(steps):
        batch = batches[i % len(batches)]
        step(batch)
        tokens += real_tokens(batch)
    synchronize()
    elapsed = time.perf_counter() - start
    return elapsed / steps, tokens / elapsed, peak_memory_mb(GPU) / 1024


def compiled_graphs() -> int:
    """Graphs torch.compile has produced so far in this process (a recompiling layer keeps adding some)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_note(opts: dict, graphs_before: int) -> str:
    return f"{compiled_graphs() - graphs_before} compiled graphs" if opts["compile"] or opts["graphs"] else ""


def mfu(flops_per_token: float, tokens_per_s: float) -> float | None:
    peak = peak_flops(GPU)
    return flops_per_token * tokens_per_s / peak if peak else None


def config_flops(config: BertTEConfig, seq_len: float) -> float:
    return train_flops_per_token(
        config.num_hidden_layers, config.hidden_size, config.intermediate_size, seq_len
    )


# ---------------------------------------------------------------------------------------------------------- steps
def stock_bert(config: BertTEConfig) -> transformers.BertForMaskedLM:
    fields = {k: v for k, v in config.to_dict().items() if k not in ("use_te_layers", "fp8", "architectures")}
    return transformers.BertForMaskedLM(transformers.BertConfig(**fields, attn_implementation="sdpa")).to(GPU)


def baseline_pretrain_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> Callable[[dict], None]:
    """Stock transformers: full-vocabulary logits at every position, HF's own loss, bf16 autocast."""

    def step(batch: dict) -> None:
        batch = move_batch(batch, GPU)
        optimizer.zero_grad(set_to_none=True)
        with BF16_AUTOCAST():
            loss = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
            ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def recipe_step(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, dict], dict],
    optimizer: torch.optim.Optimizer,
    autocast: Callable | None = None,
) -> Callable[[dict], None]:
    """The recipe's step exactly as the loop runs it: training/step.py train_step, then the optimizer."""

    def step(batch: dict) -> None:
        train_step(
            model,
            loss_fn,
            optimizer,
            [batch],
            device=GPU,
            world_size=1,
            grad_clip=1.0,
            autocast=autocast or BF16_AUTOCAST,
        )
        optimizer.step()

    return step


def ours_model(
    config: BertTEConfig, opts: dict, *, tokens: int, frozen: bool = False, te_recipe: str = "delayed"
) -> BertForMaskedLM:
    """Our model in a mode's form: TE layers, torchao FP8 training (not for a frozen teacher; TE's FP8 comes from
    the autocast) and compile as asked."""
    torch.manual_seed(0)
    if opts["te"]:
        config = copy.deepcopy(config)
        config.use_te_layers = True
    model = BertForMaskedLM(config)
    if not frozen and opts["fp8"] == "torchao":
        apply_float8(model, tokens=tokens, scaling=opts.get("scaling", "tensorwise"))
    elif opts["fp8"] == "te":
        # TE layers run FP8 under the autocast, frozen or not.
        align_packed_tokens(model, fp8_alignment("te", te_recipe))
    model.to(GPU)
    if opts["graphs"]:
        capture_cuda_graphs(model)
    elif opts["compile"]:
        compile_layers(model.bert.encoder.layer)
    return model


def mode_autocast(opts: dict, recipe: str) -> Callable:
    """bf16 autocast, with Transformer Engine's FP8 autocast inside it for the TE FP8 modes."""
    return (
        nest_contexts(BF16_AUTOCAST, te_fp8_autocast(recipe, GPU)) if opts["fp8"] == "te" else BF16_AUTOCAST
    )


# ---------------------------------------------------------------------------------------------------------- parts
def _mode(
    packed: bool,
    compile: bool = False,
    fp8: str | None = None,
    te: bool = False,
    graphs: bool = False,
    scaling: str = "tensorwise",
) -> dict:
    return dict(packed=packed, compile=compile, fp8=fp8, te=te, graphs=graphs, scaling=scaling)


OUR_MODES = {
    "bf16": _mode(packed=False),
    "bf16 +packing": _mode(packed=True),
    "bf16 +packing +compile": _mode(packed=True, compile=True),
    # training.cuda_graphs: static shapes, the whole model compiled with mode=reduce-overhead
    "bf16 +packing +graphs": _mode(packed=True, graphs=True),
    "fp8 +packing +compile": _mode(packed=True, compile=True, fp8="torchao"),
    "fp8 rowwise +packing +compile": _mode(packed=True, compile=True, fp8="torchao", scaling="rowwise"),
    "fp8 +packing +graphs": _mode(packed=True, graphs=True, fp8="torchao"),
    "te bf16 +packing": _mode(packed=True, te=True),
    "te fp8 +packing": _mode(packed=True, fp8="te", te=True),
}
TE_AVAILABLE = importlib.util.find_spec("transformer_engine") is not None


def default_modes(names: list[str]) -> list[str]:
    """The TE modes only where Transformer Engine is installed (the container has it)."""
    return [m for m in names if TE_AVAILABLE or not OUR_MODES[m]["te"]]


def attempt(part: str, mode: str, measure: Callable[[], Result]) -> Result:
    """One mode's figures; a failing mode is reported in the table (and its traceback printed), not fatal."""
    try:
        return measure()
    except Exception as error:  # noqa: BLE001 - a benchmark keeps measuring the other modes
        traceback.print_exc()
        return Result(
            part,
            mode,
            float("nan"),
            float("nan"),
            float("nan"),
            None,
            note=f"FAILED {type(error).__name__}: {str(error).splitlines()[0][:80]}",
        )
    finally:
        if GPU.type == "cuda":
            torch.cuda.empty_cache()


def baseline_pretrain(
    cells: Cells, args: argparse.Namespace, config: BertTEConfig, part: str, batch_size: int
) -> Result:
    batches = baseline_batches(cells, args.batches, batch_size)
    model = stock_bert(config)
    opt = build_optimizer(model, TrainingConfig(), GPU)
    sec, tps, peak = time_steps(baseline_pretrain_step(model, opt), batches, args.steps, args.warmup)
    pad = 1 - sum(real_tokens(b) for b in batches) / sum(b["input_ids"].numel() for b in batches)
    return Result(
        part,
        f"baseline (stock HF, {batch_size} random cells, full logits)",
        tps,
        sec * 1e3,
        peak,
        mfu(config_flops(config, mean_cell_length(batches)), tps),
        note=f"pad {pad:.0%}",
    )


def ours_pretrain(
    cells: Cells, args: argparse.Namespace, config: BertTEConfig, part: str, mode: str
) -> Result:
    opts = OUR_MODES[mode]
    batches = budget_batches(cells, args.batches, args.max_tokens, opts["packed"], static=opts["graphs"])
    model = ours_model(config, opts, tokens=args.max_tokens, te_recipe=args.te_recipe)
    opt = build_optimizer(model, TrainingConfig(), GPU)
    graphs_before = compiled_graphs()
    step = recipe_step(model, masked_lm_loss, opt, mode_autocast(opts, args.te_recipe))
    sec, tps, peak = time_steps(step, batches, args.steps, args.warmup)
    return Result(
        part,
        f"ours {mode}",
        tps,
        sec * 1e3,
        peak,
        mfu(config_flops(config, mean_cell_length(batches)), tps),
        note=compile_note(opts, graphs_before),
    )


def pretrain_part(
    cells: Cells, args: argparse.Namespace, name: str, modes: list[str], baseline: bool
) -> list[Result]:
    config, part = model_config(name, args.max_length), f"{name} pretrain"
    sizes = [int(n) for n in args.baseline_batch_size.split(",")] if baseline else []
    results = [
        attempt(part, "baseline", lambda n=n: baseline_pretrain(cells, args, config, part, n)) for n in sizes
    ]
    return results + [
        attempt(part, f"ours {mode}", lambda m=mode: ours_pretrain(cells, args, config, part, m))
        for mode in modes
    ]


def naive_distill_step(
    student: transformers.BertForMaskedLM,
    teacher: transformers.BertForMaskedLM,
    optimizer: torch.optim.Optimizer,
) -> Callable[[dict], None]:
    """The usual way: full-vocabulary logits of both stock models at every position, KL over every real token."""

    def step(batch: dict) -> None:
        batch = move_batch(batch, GPU)
        optimizer.zero_grad(set_to_none=True)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with BF16_AUTOCAST():
            with torch.no_grad():
                t_logits = teacher(input_ids=ids, attention_mask=mask).logits
            s_logits = student(input_ids=ids, attention_mask=mask).logits
            real = mask.bool()
            loss = F.kl_div(
                F.log_softmax(s_logits[real].float(), -1),
                F.log_softmax(t_logits[real].float(), -1),
                log_target=True,
                reduction="batchmean",
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()

    return step


def teacher_forward_time(
    loss_fn: DistillationLoss, batches: list[dict], steps: int, autocast: Callable
) -> float:
    """Seconds per teacher forward (as the distillation loss runs it, in the step's autocast) on the same batches."""
    for batch in batches[:3]:
        mark_graph_step()
        with autocast():
            loss_fn.teacher_outputs(move_batch(batch, GPU))
    synchronize()
    start = time.perf_counter()
    for i in range(steps):
        mark_graph_step()
        with autocast():
            loss_fn.teacher_outputs(move_batch(batches[i % len(batches)], GPU))
    synchronize()
    return (time.perf_counter() - start) / steps


DISTILL = "10m -> 4m distill"


def distill_flops(t_config: BertTEConfig, s_config: BertTEConfig, batches: list[dict]) -> float:
    """Useful FLOPs per token: the student's forward and backward plus the teacher's forward (a third of training)."""
    seq = mean_cell_length(batches)
    return config_flops(s_config, seq) + config_flops(t_config, seq) / 3


def baseline_distill(
    cells: Cells, args: argparse.Namespace, t_config: BertTEConfig, s_config: BertTEConfig
) -> Result:
    batch_size = int(args.baseline_batch_size.split(",")[0])
    batches = baseline_batches(cells, args.batches, batch_size)
    teacher = stock_bert(t_config).to(TEACHER_DTYPE).eval().requires_grad_(False)
    student = stock_bert(s_config)
    opt = build_optimizer(student, TrainingConfig(), GPU)
    sec, tps, peak = time_steps(naive_distill_step(student, teacher, opt), batches, args.steps, args.warmup)
    return Result(
        DISTILL,
        f"baseline (stock HF, {batch_size} random cells, full logits, KL every token)",
        tps,
        sec * 1e3,
        peak,
        mfu(distill_flops(t_config, s_config, batches), tps),
    )


def ours_distill(
    cells: Cells, args: argparse.Namespace, t_config: BertTEConfig, s_config: BertTEConfig, mode: str
) -> Result:
    opts = OUR_MODES[mode]
    batches = budget_batches(cells, args.batches, args.max_tokens, opts["packed"], static=opts["graphs"])
    teacher = ours_model(t_config, opts, tokens=args.max_tokens, frozen=True, te_recipe=args.te_recipe)
    teacher = teacher.to(TEACHER_DTYPE).eval().requires_grad_(False)
    student = ours_model(s_config, opts, tokens=args.max_tokens, te_recipe=args.te_recipe)
    trainable = StudentWithProjections(student, t_config.hidden_size, 0)
    loss_fn = DistillationLoss(
        teacher,
        DistillConfig(),
        default_layer_map(s_config.num_hidden_layers, t_config.num_hidden_layers),
        s_config.num_attention_heads,
    )
    opt = build_optimizer(trainable, TrainingConfig(), GPU)
    graphs_before = compiled_graphs()
    autocast = mode_autocast(opts, args.te_recipe)
    sec, tps, peak = time_steps(
        recipe_step(trainable, loss_fn, opt, autocast), batches, args.steps, args.warmup
    )
    share = teacher_forward_time(loss_fn, batches, args.steps, autocast) / sec
    return Result(
        DISTILL,
        f"ours {mode}",
        tps,
        sec * 1e3,
        peak,
        mfu(distill_flops(t_config, s_config, batches), tps),
        share,
        note=compile_note(opts, graphs_before),
    )


def distill_part(cells: Cells, args: argparse.Namespace, modes: list[str]) -> list[Result]:
    t_config, s_config = model_config("10m", args.max_length), model_config("4m", args.max_length)
    results = [attempt(DISTILL, "baseline", lambda: baseline_distill(cells, args, t_config, s_config))]
    return results + [
        attempt(DISTILL, f"ours {mode}", lambda m=mode: ours_distill(cells, args, t_config, s_config, m))
        for mode in modes
    ]


# ---------------------------------------------------------------------------------------------------------- report
def print_table(results: list[Result]) -> None:
    print(
        f"\n{'part':<20}{'mode':<62}{'real tok/s':>12}{'step ms':>9}{'peak GiB':>9}{'MFU':>7}{'teacher':>9}  note"
    )
    for r in results:
        mfu_s = f"{r.mfu:.1%}" if r.mfu is not None else "-"
        share = f"{r.teacher_share:.0%}" if r.teacher_share is not None else ""
        print(
            f"{r.part:<20}{r.mode:<62}{r.tokens_per_s:>12,.0f}{r.step_ms:>9.1f}{r.peak_gib:>9.2f}{mfu_s:>7}"
            f"{share:>9}  {r.note}"
        )
    by = {(r.part, r.mode): r.tokens_per_s for r in results}
    for part in sorted({r.part for r in results}):
        base = max((v for (p, m), v in by.items() if p == part and m.startswith("baseline")), default=None)
        if base:  # against the faster baseline
            best = max(v for (p, m), v in by.items() if p == part)
            print(f"{part}: best / baseline real tokens/s = {best / base:.2f}x")


def environment() -> str:
    if GPU.type != "cuda":
        return f"CPU smoke run, torch {torch.__version__}"
    props = torch.cuda.get_device_properties(GPU)
    return (
        f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"transformers {transformers.__version__}, python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts", default="pretrain,distill,106m", help="comma list of pretrain, distill, 106m"
    )
    parser.add_argument(
        "--modes",
        default=",".join(default_modes(list(OUR_MODES))),
        help=f"comma list of {', '.join(OUR_MODES)} (te modes need transformer_engine)",
    )
    parser.add_argument(
        "--modes-106m",
        default="bf16 +packing,bf16 +packing +compile,fp8 +packing +compile,"
        "fp8 rowwise +packing +compile,te bf16 +packing,te fp8 +packing",
        help="modes of the 106m part",
    )
    parser.add_argument(
        "--te-recipe",
        default="delayed",
        choices=["delayed", "current", "mxfp8"],
        help="training.fp8_recipe of the te fp8 modes",
    )
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode")
    parser.add_argument(
        "--warmup", type=int, default=8, help="untimed steps first (compilation happens here)"
    )
    parser.add_argument("--batches", type=int, default=40, help="distinct corpus batches cycled through")
    parser.add_argument(
        "--max-tokens", type=int, default=32768, help="our token budget per step (as 10m.yaml)"
    )
    parser.add_argument(
        "--baseline-batch-size",
        default="12,32",
        help="cells per baseline batch, comma list (12: Geneformer's per-GPU batch; the first is used "
        "for distillation)",
    )
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--builtin-dir", default=str(ROOT / "outputs" / "builtin_corpus"))
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--smoke-cpu",
        action="store_true",
        help="check the script on a CPU: one tiny fp32 step per mode, replacing --steps, --warmup, "
        "--batches, --max-tokens, --max-length and --baseline-batch-size (figures meaningless)",
    )
    args = parser.parse_args()
    if args.smoke_cpu:
        # Minutes on a laptop instead of hours: every mode and part still runs end to end.
        args.steps, args.warmup, args.batches, args.max_tokens, args.baseline_batch_size = 1, 1, 2, 2048, "2"
        global GPU, BF16_AUTOCAST, TEACHER_DTYPE, STATIC_MAX_CELLS
        # The CPU's attention fills an [all cells, longest cell] grid: short cells and few static cell slots.
        args.max_length, STATIC_MAX_CELLS = 256, 32
        GPU = torch.device("cpu")
        # fp32: CPUs without bf16 units emulate it many times slower, and the smoke checks code paths, not speed.
        BF16_AUTOCAST = functools.partial(torch.autocast, device_type="cpu", enabled=False)
        TEACHER_DTYPE = torch.float32
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_throughput.py measures GPU training; no CUDA device is visible")
    torch.backends.cuda.matmul.allow_tf32 = True
    parts, modes = args.parts.split(","), args.modes.split(",")
    for name, given, known in (
        ("--parts", parts, ("pretrain", "distill", "106m")),
        ("--modes", modes, OUR_MODES),
        ("--modes-106m", args.modes_106m.split(","), OUR_MODES),
    ):
        unknown = [item for item in given if item not in known]
        if unknown:
            parser.error(f"{name}: unknown {unknown}; choose from {', '.join(known)}")
    cells = load_cells(args.builtin_dir, args.max_length)
    print(environment())
    print(
        f"built-in corpus: {len(cells.indices)} cells, mean length {cells.corpus.lengths.mean():.0f}, "
        f"max {cells.corpus.lengths.max()}; {args.steps} timed steps after {args.warmup} warm-up steps per mode"
    )
    results: list[Result] = []
    runs = {
        "pretrain": lambda: pretrain_part(cells, args, "10m", modes, baseline=True),
        "distill": lambda: distill_part(cells, args, modes),
        "106m": lambda: pretrain_part(
            cells, args, "106m", default_modes(args.modes_106m.split(",")), baseline=False
        ),
    }
    for part in parts:
        results += runs[part]()
        print_table(results)
        if args.json:  # after every part: a run stopped by a time limit keeps the parts it finished
            Path(args.json).write_text(
                json.dumps(
                    {
                        "environment": environment(),
                        "args": vars(args),
                        "results": [r.__dict__ for r in results],
                    },
                    indent=2,
                )
            )


if __name__ == "__main__":
    main()
