"""Tokens per second (real and padded), step time, peak memory and model FLOPs utilization.

MFU counts the matmul FLOPs of the encoder plus attention, over the GPU's dense bf16 peak.
"""

from __future__ import annotations

import resource
import sys
import time

import torch

# Dense bf16 tensor-core peaks (FLOP/s) by device-name fragment.
_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _PEAK_BF16.items() if key in name), None)


def train_flops_per_token(n_layers: int, hidden: int, intermediate: int, seq_len: float) -> float:
    """Forward+backward FLOPs per token: 6 x matmul parameters plus 12 x layers x hidden x length for attention."""
    matmul_params = n_layers * (4 * hidden * hidden + 2 * hidden * intermediate)
    return 6.0 * matmul_params + 12.0 * n_layers * hidden * seq_len


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


class ThroughputMeter:
    """Accumulates tokens between log points; `report()` returns rates over that window."""

    def __init__(self, device: torch.device, world_size: int) -> None:
        self.device = device
        self.world_size = world_size
        self._reset()

    def _reset(self) -> None:
        self.start = time.perf_counter()
        self.steps = 0
        self.real_tokens = 0
        self.padded_tokens = 0

    def add(self, micro_batches: list[dict]) -> None:
        self.steps += 1
        for batch in micro_batches:
            self.padded_tokens += batch["input_ids"].numel()
            mask = batch.get("attention_mask")
            self.real_tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()

    def report(self, flops_per_token: float | None = None) -> dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        metrics = {
            "step_time_s": elapsed / max(self.steps, 1),
            "tokens_per_s_real": self.real_tokens * self.world_size / elapsed,
            "tokens_per_s_padded": self.padded_tokens * self.world_size / elapsed,
            "padding_share": 1.0 - self.real_tokens / max(self.padded_tokens, 1),
            "peak_memory_mb": peak_memory_mb(self.device),
        }
        peak = peak_flops(self.device)
        if peak and flops_per_token:
            metrics["mfu"] = flops_per_token * self.real_tokens / elapsed / peak
        self._reset()
        return metrics
