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

    def _timed(self, crc: int, data: object) -> int:
        start = time.perf_counter()
        result = self._extend(crc, data)
        self.seconds += time.perf_counter() - start
        return result


def timed_save(state: TrainState, root: Path, checksums: bool) -> float:
    """Seconds for one save: the recipe's (CRC32C summed while writing, manifest) or a bare dcp.save."""
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    if checksums:
        Checkpointer(root, rank=0).save(state)
    else:
        (root / "bare").mkdir(parents=True)
        dcp.save(state.to_checkpoint(0), checkpoint_id=str(root / "bare"))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="106m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="ckpt_bench_"))
    state = train_state(args.model)
    params = sum(p.numel() for p in state.model.parameters())
    timed_save(state, work / "warmup", checksums=True)
    times: dict[bool, list[float]] = {True: [], False: []}
    crc_seconds = []
    for _ in range(args.repeats):  # alternate, so drift in machine load hits both alike
        times[False].append(timed_save(state, work / "ckpt", checksums=False))
        clock = _CrcClock()
        times[True].append(timed_save(state, work / "ckpt", checksums=True))
        crc_seconds.append(clock.seconds)
    step_dir = work / "ckpt" / "step_00000001"
    files = [p for p in step_dir.iterdir() if p.is_file() and p.name != "COMMITTED.json"]
    size_mib = sum(p.stat().st_size for p in files) / (1 << 20)
    start = time.perf_counter()
    for path in files:
        file_crc32c(path)
    read_back = time.perf_counter() - start
    bare, summed = statistics.median(times[False]), statistics.median(times[True])
    print(
        f"model {args.model}: {params / 1e6:.1f}M parameters + AdamW state, {size_mib:.0f} MiB in {len(files)} files"
    )
    print(
        f"bare dcp.save, median of {args.repeats}: {bare:.2f} s  (all: {', '.join(f'{t:.2f}' for t in times[False])})"
    )
    print(
        f"recipe save (CRC32C while writing + manifest): {summed:.2f} s  "
        f"(all: {', '.join(f'{t:.2f}' for t in times[True])})"
    )
    crc = statistics.median(crc_seconds)
    print(
        f"time inside CRC32C during the recipe save: {crc:.2f} s ({size_mib / crc:.0f} MiB/s), "
        f"{100 * crc / bare:.1f}% of the bare save"
    )
    print(f"difference of the medians: {100 * (summed - bare) / bare:+.1f}% (noisy on a loaded machine)")
    print(
        f"for comparison, reading the files back to sum them: {read_back:.2f} s ({100 * read_back / bare:.0f}%)"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
