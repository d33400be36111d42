"""Checkpoints count only once committed; a broken newest one is reported by name and the previous one is used.

Runs in one process (DCP works without a process group); multi-rank behaviour is tested through torchrun.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint

from checkpointing.checkpointer import (
    Checkpointer,
    NoUsableCheckpointError,
    TrainState,
    committed_checkpoints,
)


class _Loader:
    def __init__(self):
        self.position = 0

    def state_dict(self):
        return {"epoch": 0, "global_position": self.position}

    def load_state_dict(self, state):
        self.position = state["global_position"]


def _state(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return TrainState(model, optimizer, scheduler, _Loader())


def _train_and_save(root, steps):
    state = _state()
    checkpointer = Checkpointer(root, rank=0, keep_last=5)
    for step in steps:
        state.step = step
        state.loader.position = step * 10
        with torch.no_grad():
            state.model[0].weight.fill_(step)
        checkpointer.save(state)
    return checkpointer


def test_resume_takes_the_newest_committed_step_and_restores_everything(tmp_path):
    _train_and_save(tmp_path, [2, 4])
    state = _state(seed=1)
    assert Checkpointer(tmp_path, rank=0).resume(state) == 4
    assert state.step == 4 and state.loader.position == 40
    assert torch.all(state.model[0].weight == 4)


def test_an_uncommitted_newest_checkpoint_is_moved_aside_and_the_previous_one_used(tmp_path, caplog):
    _train_and_save(tmp_path, [2, 4])
    (tmp_path / "step_00000004" / "COMMITTED.json").unlink()  # as if killed before the commit
    state = _state()
    assert Checkpointer(tmp_path, rank=0).resume(state) == 2
    assert "step_00000004 aside" in caplog.text and "the save never finished" in caplog.text
    assert not (tmp_path / "step_00000004").exists() and list(tmp_path.glob("step_00000004.incomplete-*"))


def test_an_uncommitted_first_save_is_no_checkpoint_so_the_run_starts_from_step_zero(tmp_path, caplog):
    _train_and_save(tmp_path, [2])
    (tmp_path / "step_00000002" / "COMMITTED.json").unlink()  # killed during the very first save
    state = _state(seed=1)
    assert Checkpointer(tmp_path, rank=0).resume(state) is None
    assert state.step == 0 and list(tmp_path.glob("step_00000002.incomplete-*"))
    assert "step_00000002 aside" in caplog.text


def _flip_bytes_inside(directory, key_part: str) -> str:
    """Overwrite the stored bytes of the first tensor whose key contains `key_part` (file size unchanged)."""
    import torch.distributed.checkpoint as dcp

    storage = dcp.FileSystemReader(str(directory)).read_metadata().storage_data
    index, info = next((i, info) for i, info in storage.items() if key_part in i.fqn)
    shard = directory / info.relative_path
    data = bytearray(shard.read_bytes())
    data[info.offset : info.offset + info.length] = bytes(
        255 - b for b in data[info.offset : info.offset + info.length]
    )
    shard.write_bytes(bytes(data))
    return shard.name


def test_bytes_flipped_inside_tensor_data_fail_the_checksum_and_the_previous_checkpoint_is_used(
    tmp_path, caplog
):
    _train_and_save(tmp_path, [2, 4])
    shard = _flip_bytes_inside(tmp_path / "step_00000004", "exp_avg")
    state = _state(seed=1)
    assert Checkpointer(tmp_path, rank=0).resume(state) == 2
    assert torch.all(state.model[0].weight == 2)
    assert f"step_00000004: {shard} fails its crc32c checksum" in caplog.text


def test_a_truncated_shard_is_reported_and_the_previous_checkpoint_used(tmp_path, caplog):
    _train_and_save(tmp_path, [2, 4])
    shard = next((tmp_path / "step_00000004").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:10])
    assert Checkpointer(tmp_path, rank=0).resume(_state()) == 2
    assert f"{shard.name} has 10 bytes" in caplog.text
    assert shard.exists()  # the evidence is left in place


def test_foreign_files_make_a_checkpoint_suspect(tmp_path, caplog):
    _train_and_save(tmp_path, [2, 4])
    (tmp_path / "step_00000004" / "stray.tmp").write_text("x")
    assert Checkpointer(tmp_path, rank=0).resume(_state()) == 2
    assert "stray.tmp" in caplog.text


def test_no_usable_checkpoint_stops_instead_of_restarting_from_zero(tmp_path):
    _train_and_save(tmp_path, [2])
    next((tmp_path / "step_00000002").glob("*.distcp")).unlink()
    with pytest.raises(NoUsableCheckpointError, match="is missing"):
        Checkpointer(tmp_path, rank=0).resume(_state())


def test_keeps_the_last_k_and_moves_a_leftover_directory_aside(tmp_path):
    (tmp_path / "step_00000006").mkdir(parents=True)  # a crashed earlier save of step 6
    checkpointer = _train_and_save(tmp_path, [2, 4, 6])
    checkpointer.keep_last = 2
    _train_and_save(tmp_path, [8])
    good, _ = committed_checkpoints(tmp_path)
    assert [s for s, _ in good] == [8, 6, 4] or [s for s, _ in good][:2] == [8, 6]
    assert list(tmp_path.glob("step_00000006.incomplete-*"))


def test_async_save_commits_when_waited_for(tmp_path):
    state = _state()
    checkpointer = Checkpointer(tmp_path, rank=0, async_save=True)
    state.step = 3
    checkpointer.save(state)
    checkpointer.wait()
    assert [s for s, _ in committed_checkpoints(tmp_path)[0]] == [3]


def test_checksums_summed_while_writing_large_tensors_equal_the_files_read_back(tmp_path):
    # Tensors above a MiB are summed on a second thread while written; the sums must still describe the files.
    from checkpointing.checksum_writer import ChecksummingWriter
    from common.checksums import file_crc32c

    state = {"big": torch.randn(1 << 20), "bigger": torch.randn(3 << 20), "small": torch.randn(8)}
    writer = ChecksummingWriter(tmp_path)
    torch.distributed.checkpoint.save(state, storage_writer=writer)
    written = {p.name: file_crc32c(p) for p in tmp_path.iterdir() if p.is_file()}
    assert writer.checksums == written
    assert max(p.stat().st_size for p in tmp_path.iterdir()) > 16 << 20
