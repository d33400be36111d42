"""Overhead of the training loop beyond forward/backward/optimizer step, at the l0_sanity config on CPU.

Run: python -m benchmarks.loop_overhead [--steps 60] [--repeats 3] [--config l0_sanity] [override ...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import training.loop
import training.run
import training.step
from training.config import RunConfig, parse_config
from training.distributed import init_distributed
from training.loop import run_loop
from training.pretrain import pretrain
from training.step import LossFn, count_masked, train_step

ROOT = Path(__file__).resolve().parents[1]


def compose_run(config_name: str, overrides: list[str]) -> RunConfig:
    """The typed RunConfig that `python train.py --config-name <config_name> <overrides>` would run."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "hydra_config"), version_base=None):
        return parse_config(compose(config_name, overrides=overrides))


class Timer:
    """Accumulates seconds spent inside wrapped calls."""

    def __init__(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def start(self) -> None:
        self._started = time.perf_counter()

    def stop(self) -> None:
        self.seconds += time.perf_counter() - self._started
        self.calls += 1

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        return timed


class TimedLoader:
    """The run's own loader, timed; keeps the batches it hands out so the bare loop can replay them."""

    def __init__(self, loader, timer: Timer, keep: list[dict]) -> None:
        self.loader, self.timer, self.keep = loader, timer, keep
        self._next = timer.wrap(loader.__next__)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self._next()
        self.keep.append(batch)
        return batch

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def timed_loop_run(run: RunConfig) -> dict:
    """Run the real train.py job (training/pretrain.py -> run_training -> run_loop) with timers around the parts
    the loop calls; returns seconds by part, the batches it consumed and its model/optimizer/loss."""
    timers = {
        name: Timer()
        for name in ("data", "logging", "eval", "checkpoint", "train_step", "optimizer_step", "count_masked")
    }
    seen: dict = {"batches": []}

    def instrumented_run_loop(parts, cfg):
        parts.train_loader = TimedLoader(parts.train_loader, timers["data"], seen["batches"])
        parts.logger.log = timers["logging"].wrap(parts.logger.log)
        parts.evaluate = timers["eval"].wrap(parts.evaluate)
        parts.checkpointer.save = timers["checkpoint"].wrap(parts.checkpointer.save)
        parts.checkpointer.wait = timers["checkpoint"].wrap(parts.checkpointer.wait)
        # Step hooks, not a wrapper: the LR scheduler watches optimizer.step itself.
        parts.optimizer.register_step_pre_hook(lambda *_: timers["optimizer_step"].start())
        parts.optimizer.register_step_post_hook(lambda *_: timers["optimizer_step"].stop())
        training.loop.train_step = timers["train_step"].wrap(train_step)
        training.step.count_masked = timers["count_masked"].wrap(count_masked)
        start = time.perf_counter()
        result = run_loop(parts, cfg)
        seen["loop_s"] = time.perf_counter() - start
        seen.update(model=parts.model, optimizer=parts.optimizer, loss_fn=parts.loss_fn)
        return result

    training.run.run_loop = instrumented_run_loop
    try:
        pretrain(run, init_distributed(run.training.device))
    finally:
        training.run.run_loop, training.loop.train_step, training.step.count_masked = (
            run_loop,
            train_step,
            count_masked,
        )
    return {
        **seen,
        **{name: t.seconds for name, t in timers.items()},
        "eval_calls": timers["eval"].calls,
        "checkpoint_calls": timers["checkpoint"].calls,
    }


def bare_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    batch: dict,
    n_masked: int,
    grad_clip: float,
) -> None:
    """Forward/backward/clip/optimizer.step on a pre-collated batch, nothing else."""
    optimizer.zero_grad(set_to_none=True)
    (loss_fn(model, batch)["loss"] / n_masked).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()


def recipe_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn, batch: dict, grad_clip: float
) -> None:
    """What run_loop does per step inside train_step + optimizer.step (mask count, metrics, finiteness check)."""
    train_step(
        model,
        loss_fn,
        optimizer,
        [batch],
        device=torch.device("cpu"),
        world_size=1,
        grad_clip=grad_clip,
        autocast=contextlib.nullcontext,
    )
    optimizer.step()


def interleaved(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    batches: list[dict],
    grad_clip: float,
    rounds: int,
) -> dict[str, float]:
    """Median seconds per step of train_step+optimizer.step vs a bare step, alternating step by step on the same
    batches and model, so machine load hits both alike."""
    times: dict[str, list[float]] = {"recipe": [], "bare": []}
    steps = {
        "recipe": lambda b, n: recipe_step(model, optimizer, loss_fn, b, grad_clip),
        "bare": lambda b, n: bare_step(model, optimizer, loss_fn, b, n, grad_clip),
    }
    for r in range(rounds):
        for i, batch in enumerate(batches):
            n_masked = int((batch["labels"] != -100).sum())
            for name in ("recipe", "bare") if (r + i) % 2 == 0 else ("bare", "recipe"):
                start = time.perf_counter()
                steps[name](batch, n_masked)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per timed run")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of the loop (after a warm-up run)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="passes over the batches for the interleaved timing"
    )
    parser.add_argument("--config", default="l0_sanity", help="hydra_config/<name>.yaml of train.py")
    parser.add_argument("overrides", nargs="*", help="extra hydra overrides, e.g. data.num_workers=1")
    args = parser.parse_args()

    os.chdir(ROOT)  # relative paths of the config (built-in corpus) resolve as for train.py run from the repo
    workdir = Path(tempfile.mkdtemp(prefix="loop_overhead_"))
    base = compose_run(
        args.config, [f"output_dir={workdir}"]
    )  # the schedule whose eval/checkpoint cost is amortized below

    def one_run(tag: str) -> dict:
        # Checkpoint and eval intervals beyond --steps: they then run once, at the last step, timed apart.
        run = compose_run(
            args.config,
            [
                f"output_dir={workdir / tag}",
                f"training.num_train_steps={args.steps}",
                f"training.warmup_steps={min(base.training.warmup_steps, args.steps // 2)}",
                f"checkpoint.every_steps={args.steps * 10}",
                f"eval.every_steps={args.steps * 10}",
                "logging.plot=false",
                *args.overrides,
            ],
        )
        return timed_loop_run(run)

    print(
        f"config {args.config} {' '.join(args.overrides)}: {args.steps} steps per run, model "
        f"{base.model['num_hidden_layers']}x{base.model['hidden_size']}, data.max_tokens={base.data.max_tokens}, "
        f"num_workers={base.data.num_workers}, log_every={base.logging.log_every}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    warm = one_run("warmup")  # first run pays allocator and kernel warm-up; its batches are replayed below
    batches, grad_clip = warm["batches"], base.training.grad_clip
    model, optimizer, loss_fn = warm["model"], warm["optimizer"], warm["loss_fn"]
    loops = [one_run(f"r{r}") for r in range(args.repeats)]
    paired = interleaved(model, optimizer, loss_fn, batches, grad_clip, rounds=args.rounds)

    def per_step(values: list[float]) -> float:
        return statistics.median(values) / args.steps * 1e3

    # Per-step loop time without the one end-of-run evaluation and checkpoint (timed apart below).
    loop_steps = [x["loop_s"] - x["eval"] - x["checkpoint"] for x in loops]
    loop_ms = per_step(loop_steps)
    data_ms = per_step([x["data"] for x in loops])
    log_ms = per_step([x["logging"] for x in loops])
    eval_s = statistics.median(x["eval"] / max(x["eval_calls"], 1) for x in loops)
    ckpt_s = statistics.median(x["checkpoint"] / max(x["checkpoint_calls"], 1) for x in loops)
    sched_ms = (eval_s / base.eval.every_steps + ckpt_s / base.checkpoint.every_steps) * 1e3
    # Within the same runs (immune to drift between runs): what the loop spends outside train_step/optimizer.step.
    compute_ms = per_step([x["train_step"] + x["optimizer_step"] for x in loops])
    count_ms = per_step([x["count_masked"] for x in loops])
    outside_ms = loop_ms - compute_ms
    direct = outside_ms + count_ms
    extra_ms = (paired["recipe"] - paired["bare"]) * 1e3
    rows = [
        ("run_loop step (eval/ckpt excluded)", loop_ms, "median of runs"),
        ("  train_step + optimizer.step", compute_ms, "inside those runs"),
        ("  outside them (loop body)", outside_ms, f"{outside_ms / loop_ms:.1%}"),
        ("    data (loader next)", data_ms, f"{data_ms / loop_ms:.1%}"),
        ("    logging (jsonl, bar)", log_ms, f"{log_ms / loop_ms:.1%}"),
        ("    rest of loop body", outside_ms - data_ms - log_ms, "meter, scheduler, preemption check"),
        ("  count_masked (in train_step)", count_ms, f"{count_ms / loop_ms:.1%} (mask count + all-reduce)"),
        ("overhead, measured inside runs", direct, f"{direct / loop_ms:.1%} of loop step (target <= 5%)"),
        (
            "train_step+opt.step, interleaved",
            paired["recipe"] * 1e3,
            "median, alternating step by step with:",
        ),
        ("bare fwd/bwd/clip/opt.step", paired["bare"] * 1e3, "same batches and model"),
        (
            "  train_step's own extra",
            extra_ms,
            f"{extra_ms / (paired['recipe'] * 1e3):.1%} (mask count, metrics, "
            "finiteness; noise when negative)",
        ),
        (
            "overhead total",
            outside_ms + extra_ms,
            f"{(outside_ms + extra_ms) / loop_ms:.1%} of loop step = loop body + train_step's extra (target <= 5%)",
        ),
        ("one held-out eval", eval_s * 1e3, f"every {base.eval.every_steps} steps"),
        ("one checkpoint save", ckpt_s * 1e3, f"every {base.checkpoint.every_steps} steps"),
        (
            "eval+ckpt amortized",
            sched_ms,
            f"{sched_ms / (loop_ms + sched_ms):.1%} of step at {args.config}'s schedule",
        ),
    ]
    print(f"{'part':<36}{'ms/step':>10}  note")
    for name, ms, note in rows:
        print(f"{name:<36}{ms:>10.2f}  {note}")
    print("runs (ms/step): loop " + ", ".join(f"{x / args.steps * 1e3:.1f}" for x in loop_steps))


if __name__ == "__main__":
    main()
