"""The markdown tables of a `gpu_session.py` folder (figures/*.json, logs/, quality/*/summary.json), ready to paste
into RESULTS.md. Written by gpu_session.py after every piece; also runs alone: python -m benchmarks.session_summary DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _fmt(value: float | None, spec: str) -> str:
    return (
        "-" if value is None or value != value else format(value, spec)
    )  # value != value: NaN (a failed mode)


def throughput_rows(path: Path) -> list[str]:
    rows = []
    for r in json.loads(path.read_text())["results"]:
        share = _fmt(r.get("teacher_share"), ".0%") if r.get("teacher_share") is not None else ""
        rows.append(
            f"| {r['part']} | {r['mode']} | {_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(r['step_ms'], '.1f')} "
            f"| {_fmt(r['peak_gib'], '.2f')} | {_fmt(r['mfu'], '.1%')} | {share} | {r['note']} |"
        )
    return rows


def fp8_layer_rows(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    rows = []
    for label, r in data["results"].items():
        if "error" in r:
            rows.append(f"| {label} | FAILED {r['error']} | | |")
        else:
            rows.append(f"| {label} | {r['ms']:.2f} | {_fmt(r.get('speedup'), '.2f')}x | {r['fp8_layers']} |")
    return rows


def quality_rows(folder: Path) -> list[str]:
    """Each quality piece's own report (benchmarks/distill_quality.py: its table and targets), under its name."""
    rows = []
    for summary in sorted(folder.glob("*/summary.json")):
        rows += ["", f"### {summary.parent.name}", "", *json.loads(summary.read_text())["report"]]
    return rows


def summary_markdown(out: Path) -> str:
    session = json.loads((out / "session.json").read_text()) if (out / "session.json").is_file() else {}
    lines = [
        f"# GPU session {session.get('started', '')}",
        "",
        "```",
        json.dumps(session.get("environment", {}), indent=1),
        "```",
        "",
        "| piece | status | seconds |",
        "|---|---|---:|",
    ]
    lines += [f"| {p['name']} | {p['status']} | {p.get('seconds', '')} |" for p in session.get("pieces", [])]
    order = [
        p["name"] for p in session.get("pieces", [])
    ]  # the session's order: pretraining, distillation, 106m
    throughput = sorted(
        (f for f in (out / "figures").glob("*.json") if not f.name.startswith("fp8_layers")),
        key=lambda f: order.index(f.stem) if f.stem in order else len(order),
    )
    if throughput:
        lines += [
            "",
            "| part | mode | real tokens/s | step ms | peak GiB | MFU | teacher | note |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for path in throughput:
            lines += throughput_rows(path)
    for path in sorted((out / "figures").glob("fp8_layers*.json")):
        lines += [
            "",
            f"{path.stem}: {json.loads(path.read_text())['args']}",
            "",
            "| variant | ms / step | vs bf16 | FP8 linears |",
            "|---|---:|---:|---:|",
            *fp8_layer_rows(path),
        ]
    quality = quality_rows(out / "quality")
    lines += quality
    pytest_log = out / "logs" / "pytest_gpu.log"
    if pytest_log.is_file():
        tail = [line for line in pytest_log.read_text().splitlines() if line.strip()][-1:]
        lines += ["", f"pytest -m gpu: {tail[0] if tail else '(no output)'}"]
    return "\n".join(lines) + "\n"


def write_summary(out: Path) -> Path:
    path = out / "summary.md"
    path.write_text(summary_markdown(out))
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m benchmarks.session_summary SESSION_DIR")
    print(summary_markdown(Path(sys.argv[1])))
