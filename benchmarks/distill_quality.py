"""Distilled student vs the same student trained with masked-LM alone, at the same budget, on the built-in corpus.

Run: python -m benchmarks.distill_quality [--steps 300] [--max-tokens 4096] [--distill-override distill.temperature=4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER_SHAPE = ["model.hidden_size=64", "model.num_hidden_layers=4", "model.num_attention_heads=4",
                 "model.intermediate_size=128"]


def shared_overrides(args: argparse.Namespace, out: Path, steps: int | None = None) -> list[str]:
    """What every run shares: data, budget, schedule, seed; eval and checkpoint only at the end (after `steps`)."""
    steps = steps or args.steps
    return [f"output_dir={out}", f"seed={args.seed}", f"model.max_position_embeddings={args.max_length}",
            f"data.max_tokens={args.max_tokens}", f"training.num_train_steps={steps}",
            f"training.warmup_steps={max(1, steps // 10)}", f"training.lr={args.lr}",
            f"checkpoint.every_steps={steps}", f"eval.every_steps={steps}",
            f"eval.max_cells={args.eval_cells}", "logging.progress_bar=false", "logging.plot=false", *args.override]


def launch(script: str, overrides: list[str], log_path: Path, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    # hydra.run.dir keeps hydra's own log and config beside the run instead of under outputs/<date>/.
    cmd = [sys.executable, str(ROOT / script), "--config-name", "l0_sanity", *overrides,
           f"hydra.run.dir={log_path.with_suffix('')}/hydra"]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(cmd[1:]), flush=True)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT)


def wait(proc: subprocess.Popen, log_path: Path) -> None:
    if proc.wait() != 0:
        raise SystemExit(f"run failed (exit {proc.returncode}); see {log_path}:\n{log_path.read_text()[-3000:]}")


def last_eval(path: Path) -> dict:
    records = [json.loads(line) for line in path.read_text().splitlines() if '"kind": "eval"' in line]
    if not records:
        raise SystemExit(f"{path} holds no eval record")
    return records[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of each of the three runs")
    p.add_argument("--max-tokens", type=int, default=4096, help="data.max_tokens (token budget per step)")
    p.add_argument("--max-length", type=int, default=256, help="model.max_position_embeddings (cells truncated)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-cells", type=int, default=80, help="held-out cells scored (all runs the same cells)")
    p.add_argument("--student", default="micro", help="hydra_config/model/<name> of the student")
    p.add_argument("--teacher-model", default="tiny", help="hydra_config/model/<name> of the teacher trained first")
    p.add_argument("--teacher-steps", type=int, default=None, help="the teacher's steps (default: --steps)")
    p.add_argument("--override", action="append", default=[],
                   help="a hydra override of every run, e.g. data.packed=true (repeatable)")
    p.add_argument("--teacher-override", action="append", default=[],
                   help=f"model.* overrides of the teacher's tiny config (default: {' '.join(TEACHER_SHAPE)})")
    p.add_argument("--distill-override", action="append", default=[], help="e.g. distill.temperature=4 (repeatable)")
    p.add_argument("--teacher", default=None, help="reuse this teacher model directory instead of training one")
    p.add_argument("--out", default="outputs/bench_distill_quality")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (the two students run in parallel)")
    args = p.parse_args()

    out = (ROOT / args.out).resolve()
    for name in ("teacher", "distilled", "mlm_only"):
        if (out / name).exists() and not (name == "teacher" and args.teacher):
            raise SystemExit(f"{out / name} exists (a run there would resume, not retrain); pass a new --out, "
                             "or --teacher DIR to reuse a trained teacher")
    start = time.perf_counter()
    teacher_dir = Path(args.teacher).resolve() if args.teacher else out / "teacher" / "final_model"
    if args.teacher is None:
        log = out / "teacher.log"
        shape = args.teacher_override or (TEACHER_SHAPE if args.teacher_model == "tiny" else [])
        # --threads, not more: on a shared CPU, OpenMP threads that wait for a busy core slow a step 5x.
        wait(launch("train.py", [f"model={args.teacher_model}", *shape,
                                 *shared_overrides(args, out / "teacher", args.teacher_steps)], log, args.threads), log)
    runs = {
        "distilled": ("distill.py", [f"model={args.student}", f"distill.teacher={teacher_dir}",
                                     *args.distill_override]),
        "mlm_only": ("train.py", [f"model={args.student}"]),
    }
    procs = {}
    for name, (script, extra) in runs.items():
        log = out / f"{name}.log"
        procs[name] = (launch(script, [*extra, *shared_overrides(args, out / name)], log, args.threads), log)
    for proc, log in procs.values():
        wait(proc, log)

    distilled = last_eval(out / "distilled" / "distill.jsonl")
    baseline = last_eval(out / "mlm_only" / "train.jsonl")
    teacher_acc = distilled["teacher_accuracy"]
    rows = {
        "teacher": (teacher_acc, distilled["teacher_loss"]),
        f"{args.student} distilled": (distilled["student_accuracy"], distilled["student_loss"]),
        f"{args.student} masked-LM only": (baseline["accuracy"], baseline["loss"]),
    }
    print(f"\nheld-out masked-LM after {args.steps} steps, {args.max_tokens} tokens/step, lr {args.lr}, cells <= "
          f"{args.max_length} tokens, {int(baseline['masked_tokens'])} masked tokens of {args.eval_cells} held-out "
          f"cells ({time.perf_counter() - start:.0f} s)")
    print(f"{'model':<28}{'accuracy':>10}{'loss':>9}{'acc/teacher':>13}")
    for name, (acc, loss) in rows.items():
        print(f"{name:<28}{acc:>10.4f}{loss:>9.3f}{acc / max(teacher_acc, 1e-12):>13.3f}")
    win = distilled["student_accuracy"] - baseline["accuracy"]
    ratio = distilled["student_accuracy"] / max(teacher_acc, 1e-12)  # an untrained teacher may score 0
    print(f"distilled - masked-LM only: {win:+.4f} ({'met' if win > 0 else 'NOT met'}: target > 0); "
          f"student/teacher: {ratio:.3f} ({'met' if ratio >= 0.9 else 'NOT met'}: target >= 0.9)")
    if teacher_acc < 0.05:
        print(f"caution: the teacher reaches only {teacher_acc:.1%} accuracy, too little training for the comparison to "
              "mean much; raise --steps (and --max-tokens)")
    summary = {"steps": args.steps, "max_tokens": args.max_tokens, "lr": args.lr,
               "distill_overrides": args.distill_override, "teacher_accuracy": teacher_acc,
               "distilled_accuracy": distilled["student_accuracy"], "mlm_only_accuracy": baseline["accuracy"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
