"""Every GPU measurement of one short GPU slice, in one call, within a time budget: throughput of each part and mode
beside the stock baseline (packing, compile, CUDA graphs, FP8), a 4b FP8 layer stack, `pytest -m gpu`, then the
distillation quality table with the time left. Each piece is a subprocess with its own time limit; figures go to files.

Run: python -m benchmarks.gpu_session --out DIR [--budget 540]    (rehearsal on a CPU: --smoke-cpu)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.session_summary import write_summary

ROOT = Path(__file__).resolve().parents[1]

STEPS = ["--steps", "12", "--warmup", "4", "--batches", "24"]
# Every full-shape quality run: students at 2,048 genes, packed 32k-token batches, 600 steps, no ablation.
QUALITY_SHAPE = [
    "--no-ablation",
    "--steps",
    "600",
    "--max-tokens",
    "32768",
    "--max-length",
    "2048",
    "--eval-cells",
    "256",
    "--lr",
    "1e-3",
    "--override",
    "data.packed=true",
]
QUALITY_TEACHER = (
    "{out}/quality/quality_4m/teacher/final_model"  # the 10m teacher the 3m and 2m students reuse
)


@dataclass
class Piece:
    """One measurement: its command (without the output file), the seconds it may take, where its figures go."""

    name: str
    command: list[str]
    limit_s: int
    figures: str | None = None  # the file name its --json writes (under figures/)
    min_left_s: int = 0  # skipped unless this much of the budget is left
    needs: str | None = None  # skipped unless this path (an earlier piece's output) exists


def gpu_pieces() -> list[Piece]:
    py, tp = sys.executable, "benchmarks.gpu_throughput"
    return [
        Piece("pytest_gpu", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"], 60),
        Piece(
            "pretrain_10m",
            [
                py,
                "-m",
                tp,
                "--parts",
                "pretrain",
                "--baseline-batch-size",
                "32",
                *STEPS,
                "--modes",
                "bf16 +packing,bf16 +packing +compile,bf16 +packing +graphs,fp8 +packing +compile",
            ],
            140,
            "pretrain_10m.json",
        ),
        Piece(
            "distill_10m_4m",
            [
                py,
                "-m",
                tp,
                "--parts",
                "distill",
                "--baseline-batch-size",
                "12",
                *STEPS,
                "--modes",
                "bf16 +packing +compile,bf16 +packing +graphs",
            ],
            140,
            "distill_10m_4m.json",
        ),
        Piece(
            "pretrain_106m",
            [
                py,
                "-m",
                tp,
                "--parts",
                "106m",
                *STEPS,
                "--modes-106m",
                "bf16 +packing +compile,fp8 +packing +compile,fp8 rowwise +packing +compile",
            ],
            120,
            "pretrain_106m.json",
        ),
        # At the 4b shape every layer gains, so `auto` is `all` there.
        Piece(
            "fp8_layers_4b",
            [
                py,
                "-m",
                "benchmarks.fp8_layers",
                "--model",
                "4b",
                "--layers",
                "4",
                "--variants",
                "fp8 tensorwise auto,fp8 rowwise auto",
            ],
            80,
            "fp8_layers_4b.json",
        ),
        # With what is left: a 10m teacher, then a 4m student distilled and trained by masked-LM alone.
        Piece(
            "quality_4m",
            [
                py,
                "-m",
                "benchmarks.distill_quality",
                "--teacher-model",
                "10m",
                "--students",
                "4m",
                "--teacher-steps",
                "1500",
                *QUALITY_SHAPE,
            ],
            240,
            min_left_s=150,
        ),
        *(
            Piece(
                f"quality_{student}",
                [
                    py,
                    "-m",
                    "benchmarks.distill_quality",
                    "--teacher",
                    QUALITY_TEACHER,
                    "--students",
                    student,
                    *QUALITY_SHAPE,
                ],
                100,
                min_left_s=80,
                needs=QUALITY_TEACHER,
            )
            for student in ("3m", "2m")
        ),
    ]


def smoke_pieces() -> list[Piece]:
    """The same pieces at tiny shapes on the CPU: checks the commands and files, not speed."""
    py, tp = sys.executable, "benchmarks.gpu_throughput"
    smoke = ["--smoke-cpu"]
    return [
        Piece("pytest_gpu", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"], 300),
        Piece(
            "pretrain_10m",
            [
                py,
                "-m",
                tp,
                "--parts",
                "pretrain",
                *smoke,
                "--modes",
                "bf16 +packing,bf16 +packing +graphs,fp8 +packing +compile",
            ],
            900,
            "pretrain_10m.json",
        ),
        Piece(
            "distill_10m_4m",
            [py, "-m", tp, "--parts", "distill", *smoke, "--modes", "bf16 +packing +graphs"],
            900,
            "distill_10m_4m.json",
        ),
        Piece(
            "pretrain_106m",
            [py, "-m", tp, "--parts", "106m", *smoke, "--modes-106m", "fp8 rowwise +packing +compile"],
            900,
            "pretrain_106m.json",
        ),
        # Tiny widths gain nothing from FP8: `all` runs the FP8 layers anyway.
        Piece(
            "fp8_layers_4b",
            [
                py,
                "-m",
                "benchmarks.fp8_layers",
                "--model",
                "4b",
                *smoke,
                "--variants",
                "fp8 tensorwise auto,fp8 rowwise all",
            ],
            300,
            "fp8_layers_4b.json",
        ),
        _smoke_quality("quality_4m", ["--teacher-model", "tiny", "--teacher-steps", "2"]),
        _smoke_quality("quality_3m", ["--teacher", QUALITY_TEACHER], needs=QUALITY_TEACHER),
    ]


def _smoke_quality(name: str, teacher: list[str], needs: str | None = None) -> Piece:
    """A distillation quality piece at tiny shapes: a `micro` student, 2 steps, cells of 64 genes."""
    tiny = [
        "--students",
        "micro",
        "--no-ablation",
        "--steps",
        "2",
        "--max-tokens",
        "512",
        "--max-length",
        "64",
    ]
    command = [sys.executable, "-m", "benchmarks.distill_quality", *teacher, *tiny, "--eval-cells", "8"]
    return Piece(name, command, 600, min_left_s=60, needs=needs)


def run_piece(piece: Piece, out: Path, left_s: float, builtin_dir: Path) -> dict:
    """Run one piece under min(its limit, the budget left); its output goes to logs/<name>.log."""
    limit = int(min(piece.limit_s, left_s))
    if left_s < max(piece.min_left_s, 10):
        return {"name": piece.name, "status": f"skipped: {left_s:.0f} s of the budget left"}
    if piece.needs and not Path(piece.needs.replace("{out}", str(out))).exists():
        return {"name": piece.name, "status": f"skipped: no {piece.needs} (an earlier piece did not finish)"}
    command = [part.replace("{out}", str(out)) for part in piece.command]
    if piece.figures:
        command += ["--json", str(out / "figures" / piece.figures)]
    if command[1:3] == ["-m", "benchmarks.gpu_throughput"]:
        command += ["--builtin-dir", str(builtin_dir)]
    if command[1:3] == ["-m", "benchmarks.distill_quality"]:
        command += ["--out", str(out / "quality" / piece.name)]
    log = out / "logs" / f"{piece.name}.log"
    print(f"[{piece.name}] up to {limit} s: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    with log.open("w") as handle:
        try:
            rc = subprocess.run(
                command,
                cwd=ROOT,
                stdout=handle,
                stderr=subprocess.STDOUT,
                timeout=limit,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            ).returncode
            status = "ok" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            status = f"stopped at its {limit} s limit (figures of finished parts kept)"
    seconds = time.perf_counter() - start
    print(f"[{piece.name}] {status} after {seconds:.0f} s", flush=True)
    return {
        "name": piece.name,
        "status": status,
        "seconds": round(seconds, 1),
        "log": str(log.relative_to(out)),
    }


def environment() -> dict:
    """Machine and versions, for the dated section of RESULTS.md."""
    info = {"python": platform.python_version(), "host": platform.node(), "cpus": os.cpu_count()}
    for module in ("torch", "torchao", "transformers"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = "missing"
    try:
        info["nvidia-smi"] = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["nvidia-smi"] = "unavailable"
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for figures/, logs/, quality/ and session.json")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for everything (default 540 on a GPU, 3600 with --smoke-cpu)",
    )
    parser.add_argument("--only", default=None, help="comma list of piece names to run (default: all)")
    parser.add_argument("--builtin-dir", default=str(ROOT / "outputs" / "builtin_corpus"))
    parser.add_argument(
        "--smoke-cpu", action="store_true", help="rehearse every piece on a CPU at tiny shapes"
    )
    args = parser.parse_args()
    pieces = smoke_pieces() if args.smoke_cpu else gpu_pieces()
    if args.only:
        pieces = [p for p in pieces if p.name in args.only.split(",")]
    budget = args.budget or (3600.0 if args.smoke_cpu else 540.0)
    out = Path(args.out).resolve()
    for sub in ("figures", "logs", "quality"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    session = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "smoke_cpu": args.smoke_cpu,
        "budget_s": budget,
        "environment": environment(),
        "pieces": [],
    }
    start = time.perf_counter()
    for piece in pieces:
        session["pieces"].append(
            run_piece(piece, out, budget - (time.perf_counter() - start), Path(args.builtin_dir))
        )
        session["elapsed_s"] = round(time.perf_counter() - start, 1)
        (out / "session.json").write_text(json.dumps(session, indent=2) + "\n")  # after every piece
        write_summary(out)
    print(
        f"done in {session['elapsed_s']:.0f} s of {budget:.0f}; tables in {out / 'summary.md'}, logs in {out / 'logs'}"
    )


if __name__ == "__main__":
    main()
