"""Cost of the per-file CRC32C checksums in a checkpoint save, for a 106m-shaped model + AdamW state on CPU.

Run: python -m benchmarks.checkpoint_checksums [--model 106m] [--repeats 3] [--dir /tmp/ckpt_bench]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from torch.distributed.checkpoint import FileSystemWriter

import checkpointing.checksum_writer as checksum_writer
from checkpointing.checkpointer import Checkpointer, TrainState
from common.checksums import file_crc32c
from modeling_bert_te import BertForMaskedLM, BertTEConfig

ROOT = Path(__file__).resolve().parents[1]


class _Loader:
    def state_dict(self) -> dict:
        return {"epoch": 0, "global_position": 0}


def train_state(model_name: str) -> TrainState:
    """The model of hydra_config/model/<name>.yaml with a full AdamW state (one step taken)."""
    fields = OmegaConf.to_container(OmegaConf.load(ROOT / "hydra_config" / "model" / f"{model_name}.yaml"))
    model = BertForMaskedLM(BertTEConfig(**fields))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return TrainState(model, optimizer, scheduler, _Loader(), step=1)


class _CrcClock:
    """Seconds spent inside the CRC32C of the checksumming writer (summed over a save)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._extend = checksum_writer.extend_crc32c
        checksum_writer.extend_crc32c = self._timed

    def stop(self) -> None:
        checksum_writer.extend_crc32c = self._extend

    def _timed(self, crc: int, data: object) -> int:
        start = time.perf_counter()
        result = self._extend(crc, data)
        self.seconds += time.perf_counter() - start
        return result


KINDS = ("bare", "summed", "recipe")


def timed_save(state: TrainState, root: Path, kind: str) -> tuple[float, float]:
    """Seconds for one save (a bare dcp.save, the same with the checksumming writer, or the recipe's whole save:
    checksumming writer, manifest with fsync, rotation), and the seconds its writer waited for checksums."""
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    if kind == "recipe":
        Checkpointer(root, rank=0).save(state)
        return time.perf_counter() - start, float("nan")
    (root / "step").mkdir(parents=True)
    writer = (checksum_writer.ChecksummingWriter if kind == "summed" else FileSystemWriter)(root / "step")
    dcp.save(state.to_checkpoint(0), storage_writer=writer)
    return time.perf_counter() - start, getattr(writer, "waited_s", 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="106m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="ckpt_bench_"))
    state = train_state(args.model)
    params = sum(p.numel() for p in state.model.parameters())
    timed_save(state, work / "warmup", "recipe")
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    crc_seconds, waited = [], []
    for _ in range(args.repeats):  # alternate, so drift in machine load hits each kind alike
        for kind in KINDS:
            # The clock's own overhead (tens of thousands of small sums) would inflate the wait: time the sums
            # only in the recipe's saves, the wait only in the plain summed ones.
            clock = _CrcClock() if kind == "recipe" else None
            seconds, wait = timed_save(state, work / kind, kind)
            times[kind].append(seconds)
            if clock:
                clock.stop()
                crc_seconds.append(clock.seconds)
            if kind == "summed":
                waited.append(wait)
    step_dir = work / "recipe" / "step_00000001"
    files = [p for p in step_dir.iterdir() if p.is_file() and p.name != "COMMITTED.json"]
    size_mib = sum(p.stat().st_size for p in files) / (1 << 20)
    start = time.perf_counter()
    for path in files:
        file_crc32c(path)
    read_back = time.perf_counter() - start
    bare, summed, recipe = (statistics.median(times[kind]) for kind in KINDS)
    print(
        f"model {args.model}: {params / 1e6:.1f}M parameters + AdamW state, {size_mib:.0f} MiB in {len(files)} files"
    )
    for kind, label in zip(
        KINDS,
        ("bare dcp.save", "dcp.save, CRC32C while writing", "recipe save (that + manifest, fsync)"),
        strict=True,
    ):
        runs = ", ".join(f"{t:.2f}" for t in times[kind])
        print(f"{label}, median of {args.repeats}: {statistics.median(times[kind]):.2f} s  (all: {runs})")
    crc = statistics.median(crc_seconds)
    print(
        f"time inside CRC32C during the recipe save: {crc:.2f} s ({size_mib / crc:.0f} MiB/s), "
        f"{100 * crc / bare:.1f}% of the bare save (buffers over a MiB are summed on a second thread "
        "while written, so this is an upper bound of the cost)"
    )
    wait = statistics.median(waited)
    print(
        f"the writing thread waited for checksums {wait:.3f} s per save ({100 * wait / bare:.1f}% of the bare "
        "save): the checksums' cost, measured directly (the target: under 5%)"
    )
    print(
        f"cost of the checksums (difference of the medians): {100 * (summed - bare) / bare:+.1f}% "
        "(noisy: the same save's time varies by more)"
    )
    print(f"the whole recipe save vs bare: {100 * (recipe - bare) / bare:+.1f}%")
    print(
        f"for comparison, reading the files back to sum them: {read_back:.2f} s ({100 * read_back / bare:.0f}%)"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
