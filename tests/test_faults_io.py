"""Disk full or an unwritable directory while saving a checkpoint or exporting a model.

The save fails with an error naming the file, the previous checkpoint (or export) stays intact, and the
partial save is never taken for a complete one. Under 2-rank torchrun a failing rank does not hang the other.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_fs

import checkpointing.manifest as manifest
import model.hf_dir as export
from checkpointing.checkpointer import Checkpointer, committed_checkpoints
from checkpointing.save_errors import CheckpointSaveError
from modeling_bert_te import BertForMaskedLM, BertTEConfig
from tests.fault_runs import COMMON, committed_steps, fault_env
from tests.launch import REPO, run_entry
from tests.test_checkpointer import _state


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "the checkpoint shard")


def _saved_at(root: Path, step: int, value: float) -> Checkpointer:
    state = _state()
    state.step = step
    with torch.no_grad():
        state.model[0].weight.fill_(value)
    checkpointer = Checkpointer(root, rank=0)
    checkpointer.save(state)
    return checkpointer


def _assert_step_2_is_what_resume_gets(root: Path, caplog) -> None:
    assert [s for s, _ in committed_checkpoints(root)[0]] == [2]
    state = _state(seed=1)
    assert Checkpointer(root, rank=0).resume(state) == 2
    assert torch.all(state.model[0].weight == 2.0)  # the previous checkpoint, intact
    assert "step_00000004 aside" in caplog.text and "the save never finished" in caplog.text


def test_disk_full_while_writing_shards(tmp_path, monkeypatch, caplog):
    _saved_at(tmp_path, 2, 2.0)
    monkeypatch.setattr(dcp_fs, "_write_item", _disk_full)
    with pytest.raises(CheckpointSaveError, match="No space left on device") as error:
        _saved_at(tmp_path, 4, 4.0)
    assert "step_00000004" in str(error.value) and "Free disk space" in str(error.value)
    monkeypatch.undo()
    _assert_step_2_is_what_resume_gets(tmp_path, caplog)


def test_disk_full_while_writing_the_commit_record(tmp_path, monkeypatch, caplog):
    _saved_at(tmp_path, 2, 2.0)

    def dump_half(record, handle, **kwargs):
        handle.write(json.dumps(record)[:20])  # a torn write, then the disk is full
        _disk_full()

    monkeypatch.setattr(
        manifest,
        "json",
        types.SimpleNamespace(dump=dump_half, loads=json.loads, JSONDecodeError=json.JSONDecodeError),
    )
    with pytest.raises(CheckpointSaveError, match="No space left on device"):
        _saved_at(tmp_path, 4, 4.0)
    monkeypatch.undo()
    assert (tmp_path / "step_00000004" / "COMMITTED.json.tmp").is_file()  # the torn record is not the commit
    _assert_step_2_is_what_resume_gets(tmp_path, caplog)
    assert list(tmp_path.glob("step_00000004.incomplete-*/COMMITTED.json.tmp"))  # kept aside as evidence


def test_a_real_write_limit_in_a_subprocess_fails_the_save_not_the_previous_checkpoint(tmp_path, caplog):
    """RLIMIT_FSIZE makes the kernel itself refuse the write (EFBIG), as a full quota would."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from tests.test_faults_io import _saved_at
        _saved_at({str(tmp_path)!r}, 2, 2.0)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the error, not the signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
        _saved_at({str(tmp_path)!r}, 4, 4.0)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "File too large" in result.stderr, result.stderr[-3000:]
    _assert_step_2_is_what_resume_gets(tmp_path, caplog)


def _save_a_large_tensor_under_a_write_limit(root: Path, limit: int) -> None:
    """Save step 2 whole, then step 4 (a 256 KiB weight) with the kernel refusing writes past `limit` bytes."""
    import resource
    import signal

    state = _state()
    state.model[0] = torch.nn.Linear(256, 256)
    state.optimizer = torch.optim.AdamW(state.model.parameters())
    state.step = 2
    checkpointer = Checkpointer(root, rank=0)
    checkpointer.save(state)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the error, not the signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    state.step = 4
    checkpointer.save(state)


def test_a_write_limit_hit_inside_torch_save_is_named_with_the_free_space(tmp_path, caplog):
    """torch.save reports the refused write as 'enforce fail ... unexpected pos'; the message names the cause."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from tests.test_faults_io import _save_a_large_tensor_under_a_write_limit
        _save_a_large_tensor_under_a_write_limit(__import__("pathlib").Path({str(tmp_path)!r}), 100_000)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert "CheckpointSaveError: could not write checkpoint" in message and "step_00000004" in message, (
        message
    )
    assert f"the file-size limit (ulimit -f) stopped the write at {tmp_path} (" in message
    assert " MiB free)" in message and "File too large" in message
    assert "unexpected pos" in result.stderr  # the write did fail inside torch.save
    assert [s for s, _ in committed_checkpoints(tmp_path)[0]] == [2]


def test_disk_full_hidden_under_a_writer_error_is_named_with_the_free_space(tmp_path):
    """The OSError that torch.save swallows survives only as __context__; the chain is walked to find it."""
    from checkpointing.save_errors import save_errors_named

    with pytest.raises(CheckpointSaveError) as error, save_errors_named(tmp_path / "step_00000004"):
        try:
            _disk_full()
        except OSError:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"
            ) from None
    assert f"no space left on device at {tmp_path} (" in str(error.value) and " MiB free)" in str(error.value)


def test_an_unwritable_checkpoint_directory_is_named(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the checkpoint directory should be")
    with pytest.raises(CheckpointSaveError, match="not_a_dir/checkpoints/step_00000002") as error:
        _saved_at(blocker / "checkpoints", 2, 2.0)
    assert isinstance(error.value.__cause__, OSError) and "set checkpoint.dir" in str(error.value)


def test_a_shard_corrupted_in_place_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
    """Same size, garbage bytes (bit rot): the sizes pass, the checksum fails, resume uses the previous one."""
    _saved_at(tmp_path, 2, 2.0)
    _saved_at(tmp_path, 4, 4.0)
    shard = next((tmp_path / "step_00000004").glob("*.distcp"))
    shard.write_bytes(b"\xff" * shard.stat().st_size)
    state = _state(seed=1)
    assert Checkpointer(tmp_path, rank=0).resume(state) == 2
    assert torch.all(state.model[0].weight == 2.0)
    assert f"step_00000004: {shard.name} fails its crc32c checksum" in caplog.text
    assert shard.read_bytes() == b"\xff" * shard.stat().st_size  # the evidence stays as it was


def _tiny_model() -> BertForMaskedLM:
    torch.manual_seed(0)
    return BertForMaskedLM(
        BertTEConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
        )
    )


def test_disk_full_during_export_keeps_the_previous_export(tmp_path, monkeypatch):
    model = _tiny_model()
    out = export.export_model_dir(model.state_dict(), model.config, tmp_path / "final_model", None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def save_half(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 100)
        _disk_full()

    monkeypatch.setattr(export, "save_file", save_half)
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.add_(1.0)
    with pytest.raises(OSError, match="No space left on device"):
        export.export_model_dir(model.state_dict(), model.config, out, None, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old export, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_model"]  # no half-written temp dir left
    BertForMaskedLM.from_pretrained(out)


def test_an_unwritable_export_target_is_named(tmp_path):
    model = _tiny_model()
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(OSError, match="blocker"):
        export.export_model_dir(model.state_dict(), model.config, tmp_path / "blocker" / "final_model", None)


@pytest.mark.slow
@pytest.mark.parametrize(("point", "rank"), [("enospc_shard", 1), ("enospc_commit", 0)])
def test_disk_full_on_one_rank_ends_the_whole_torchrun_job(tmp_path, point, rank):
    """The failing rank raises, the other rank does not wait forever, and step 2 stays the newest checkpoint."""
    result = run_entry(
        "train.py",
        [*COMMON, f"output_dir={tmp_path / 'run'}"],
        nproc=2,
        tmp=tmp_path,
        env=fault_env(point, rank, 4),
        check=False,
        timeout=240,
    )  # a hang fails with TimeoutExpired
    assert result.returncode != 0
    assert "ERROR run: could not write checkpoint" in result.stderr
    assert "[Errno 28] No space left on device" in result.stderr and "step_00000004" in result.stderr
    assert committed_steps(tmp_path / "run" / "checkpoints") == [2]
    assert not (tmp_path / "run" / "final_model").exists()
