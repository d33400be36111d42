"""On GPUs the process group pairs NCCL (CUDA tensors) with gloo (CPU tensors): the loop reduces host-side values,
such as masked-token counts, step metrics and the preemption flag, as CPU tensors.

CPU machines have no NCCL, so here gloo stands in for it on the CUDA side of the same layout.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist

from modeling_bert_te import BertForMaskedLM, BertTEConfig
from training.distributed import process_group_backend
from training.preemption import PreemptionWatcher
from training.run import masked_lm_loss
from training.step import train_step

GPU_LAYOUT = process_group_backend(torch.device("cuda", 0))


def test_gpu_group_sends_cpu_tensors_to_gloo_and_cuda_tensors_to_nccl():
    assert dict(pair.split(":") for pair in GPU_LAYOUT.split(",")) == {"cpu": "gloo", "cuda": "nccl"}
    assert process_group_backend(torch.device("cpu")) == "gloo"


def test_torchrun_on_gpus_joins_with_both_backends(monkeypatch):
    """init_distributed as torchrun's second rank on a GPU machine (device and group faked: no GPU here)."""
    import training.distributed as distributed

    joined = {}
    monkeypatch.setattr(
        distributed, "_pick_device", lambda requested, local_rank: torch.device("cuda", local_rank)
    )
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kwargs: joined.update(kwargs))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = distributed.init_distributed("auto")
    assert ctx.device == torch.device("cuda", 1)
    assert joined["backend"] == GPU_LAYOUT and joined["device_id"] == torch.device("cuda", 1)


def _step_and_preemption_check() -> tuple[dict, bool]:
    torch.manual_seed(0)
    model = BertForMaskedLM(
        BertTEConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
        )
    )
    ids = torch.randint(2, 50, (2, 8))
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.where(ids % 2 == 0, ids, -100),
    }
    metrics = train_step(
        model,
        masked_lm_loss,
        torch.optim.SGD(model.parameters(), lr=0.1),
        [batch],
        device=torch.device("cpu"),
        world_size=1,
        grad_clip=1.0,
        autocast=contextlib.nullcontext,
    )
    return metrics, PreemptionWatcher().stop_requested()


@pytest.mark.parametrize(
    ("layout", "has_cpu_backend"),
    [
        (GPU_LAYOUT.replace("nccl", "gloo"), True),  # the layout of a GPU run
        ("cuda:gloo", False),  # like an NCCL-only group: every host-side reduction fails
    ],
)
def test_a_training_step_needs_a_cpu_backend_in_the_group(tmp_path, layout, has_cpu_backend):
    dist.init_process_group(backend=layout, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        if has_cpu_backend:
            metrics, stop = _step_and_preemption_check()
            assert metrics["finite"] and metrics["masked_tokens"] > 0 and stop is False
        else:
            with pytest.raises(RuntimeError, match="device type cpu"):
                _step_and_preemption_check()
    finally:
        dist.destroy_process_group()
