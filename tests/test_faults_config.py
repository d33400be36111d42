"""A bad config stops train.py before any heavy work with one line naming the key and the allowed values, exit 2.

train.py's entry runs in-process on a hydra-composed config, exactly as `python train.py <overrides>` would.
"""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from tests.launch import FAST, REPO
from training.entry import run_entry as entry_point
from training.pretrain import pretrain


def _exit_line(tmp_path, capfd, overrides: list[str]) -> str:
    """Run train.py's entry in-process; return the single error line it logged (asserting exit code 2)."""
    paths = [
        f"output_dir={tmp_path / 'run'}",
        f"data.builtin_dir={tmp_path / 'builtin'}",
        f"data.cache_dir={tmp_path / 'cache'}",
    ]
    with initialize_config_dir(str(REPO / "hydra_config"), version_base=None):
        cfg = compose("l0_sanity", overrides=[*paths, *FAST, *overrides])
    with pytest.raises(SystemExit) as stop:
        entry_point(cfg, pretrain)  # sets up its own logging on stderr, as train.py does
    assert stop.value.code == 2
    stderr = capfd.readouterr().err
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written
    return errors[0]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("+training.learning_rate=1e-3", "unknown config key 'training.learning_rate'"),
        ("+data.max_token=10", "unknown config key 'data.max_token'"),
        ("data.max_tokens=0", "config 'data.max_tokens': must be > 0"),
        ("training.num_train_steps=-5", "config 'training.num_train_steps': must be > 0"),
        ("training.grad_accum_steps=0", "config 'training.grad_accum_steps': must be > 0"),
        ("checkpoint.every_steps=0", "config 'checkpoint.every_steps': must be > 0"),
        ("training.strategy=zero3", "config 'training.strategy': got 'zero3', allowed: ddp, fsdp2"),
        ("training.nonfinite=ignore", "config 'training.nonfinite': got 'ignore', allowed: stop, skip"),
        ("training.lr=fast", "training.lr"),
    ],
)
def test_invalid_values_are_refused_before_any_data_is_read(tmp_path, capfd, override, expected):
    assert expected in _exit_line(tmp_path, capfd, [override])
    assert not (tmp_path / "builtin").exists()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.num_attention_heads=3", "num_attention_heads"),
        ("model.hidden_size=0", "hidden_size"),
        ("model.num_hidden_layers=-1", "num_hidden_layers"),
    ],
)
def test_impossible_model_shapes_are_refused_before_any_data_is_read(tmp_path, capfd, override, expected):
    assert expected in _exit_line(tmp_path, capfd, [override])
    assert not (tmp_path / "builtin").exists()


def test_a_token_budget_below_the_longest_cell_is_refused_before_training(tmp_path, capfd):
    line = _exit_line(tmp_path, capfd, ["data.max_tokens=64"])  # cells are up to 128 tokens here
    assert "max_tokens" in line and "64" in line


def test_cuda_requested_on_a_machine_without_one(tmp_path, capfd):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    line = _exit_line(tmp_path, capfd, ["training.device=cuda"])
    assert "training.device" in line and "training.device=cpu" in line


@pytest.mark.parametrize(
    "tool",
    [
        ["-m", "serving.export_onnx", "--out", "{tmp}/onnx"],
        ["-m", "interpret.cell"],
        ["evaluate.py"],
        ["-m", "checkpointing.export_checkpoint", "--out", "{tmp}/m"],
    ],
)
def test_command_line_tools_report_a_missing_model_in_one_line(tmp_path, tool):
    """The plain (non-hydra) tools end a user error as the jobs do: one line, exit 2, nothing written."""
    import subprocess
    import sys

    args = [part.format(tmp=tmp_path) for part in tool]
    done = subprocess.run(
        [sys.executable, *args, str(tmp_path / "no_model")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no_model" in last, done.stderr
    assert not any(tmp_path.iterdir())


def test_a_mistyped_key_without_plus_ends_train_py_in_the_recipes_one_line(tmp_path):
    """Hydra refuses an override of a missing key before the recipe starts; it still ends in the recipe's line.
    (With `+`, the key reaches the schema check above.)"""
    from tests.launch import run_entry as launch

    done = launch(
        "train.py",
        [f"output_dir={tmp_path / 'run'}", "training.lrr=1e-3"],
        tmp=tmp_path,
        check=False,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "unknown config key 'training.lrr'; did you mean 'training.lr'?" in errors[0]
    assert not (tmp_path / "builtin").exists() and not (tmp_path / "run" / "train.jsonl").exists()
