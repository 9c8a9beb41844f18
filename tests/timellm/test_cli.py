"""`ckptkit train` and `ckptkit predict` from the ckptkit_timellm plugin: registered through
the CLI hook, every option explained in --help, bad input a one-line error with a
non-zero exit code and no traceback (through CliRunner, and the installed console
script with entry-point autoload for a few)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner, Result

from ckptkit import CheckpointManager
from ckptkit.cli import _register_commands

from .train_script import (
    CKPTKIT,
    CLI_ARGS,
    PROCESS_TIMEOUT,
    ROOT,
    assert_one_line_error,
    cli_env,
    copy_run,
    finished_run,
    fork_server,
    one_thread,
    steps,
    timellm_cli,
)


@pytest.fixture(scope="module")
def cli() -> Iterator[click.Group]:
    with one_thread(), timellm_cli() as group:
        yield group


@pytest.fixture
def run_with_checkpoint(tmp_path: Path) -> Path:
    """A run that has a checkpoint (of anything: --resume never looks no further)."""
    run = tmp_path / "taken"
    with CheckpointManager(str(run)) as mgr:
        mgr.save(1, {"x": torch.zeros(1)})
    return run


def invoke(cli: click.Group, *args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_plugin_registers_train_and_predict_once(cli: click.Group) -> None:
    commands = dict(cli.commands)
    assert {"train", "predict"} <= commands.keys()
    _register_commands()  # again: the same commands, no duplicates
    assert cli.commands == commands
    listing = invoke(cli, "--help").output
    assert "train" in listing and "predict" in listing


@pytest.mark.parametrize("name", ["train", "predict"])
def test_help_explains_every_option(cli: click.Group, name: str) -> None:
    result = invoke(cli, name, "--help")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for param in cli.commands[name].params:
        assert isinstance(param, click.Option), f"{name}: undocumented argument {param.name}"
        assert param.help and len(param.help) > 15, f"{name} {param.opts}: no help"
        for opt in (*param.opts, *param.secondary_opts):
            assert opt in result.output, f"{name} --help does not list {opt}"
        assert " ".join(param.help.split())[:30] in text, f"{name} {param.opts}: help not shown"


def test_bad_train_input_is_one_line(
    cli: click.Group, tmp_path: Path, run_with_checkpoint: Path
) -> None:
    out = tmp_path / "out"
    cases = [
        (("--preset", "nope", "--output", out), 2, "unknown 'nope'"),
        ((*CLI_ARGS, "--output", tmp_path / "empty", "--resume", "latest"), 3, "--resume auto"),
        ((*CLI_ARGS, "--output", run_with_checkpoint, "--resume", "never"), 2, "--overwrite"),
        ((*CLI_ARGS, "--output", out, "--save-steps", "0"), 2, "save-steps"),
        ((*CLI_ARGS, "--output", out, "--label-len", "40"), 2, "label_len"),
        ((*CLI_ARGS, "--output", out, "--data", tmp_path / "nope.csv"), 2, "nope.csv"),
    ]
    for args, code, words in cases:
        result = invoke(cli, "train", *args)
        assert_one_line_error(result.exit_code, result.stderr, code, words)
    assert steps(run_with_checkpoint) == [1]  # refused, not overwritten


def test_changed_config_needs_force(
    cli: click.Group, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    run = copy_run(finished_run(tmp_path_factory.getbasetemp()), tmp_path / "run")
    args = ("train", *CLI_ARGS, "--output", run, "--learning-rate", "0.005")
    result = invoke(cli, *args)
    assert_one_line_error(result.exit_code, result.stderr, 6, "learning_rate: 0.01 -> 0.005")
    result = invoke(cli, *args, "--force")
    assert result.exit_code == 0, result.output + result.stderr
    assert "resumed at step 12" in result.output


def test_bad_predict_input_is_one_line(cli: click.Group, tmp_path: Path) -> None:
    out = tmp_path / "f.csv"
    base = ("predict", "--data", "ETTh1", "--out", out)
    result = invoke(cli, *base, "--checkpoint", tmp_path / "nothing-here")
    assert_one_line_error(result.exit_code, result.stderr, 3, "nothing-here")
    result = invoke(cli, *base, "--checkpoint", tmp_path, "--which", "first")
    assert_one_line_error(result.exit_code, result.stderr, 2, "--which")
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(CKPTKIT is None, reason="the ckptkit console script is not installed")
def test_real_processes_report_errors_in_one_line(
    tmp_path: Path, run_with_checkpoint: Path
) -> None:
    # The installed console script (entry-point autoload on: `train` comes from the
    # plugin's entry point), and the same entry point forked from the fork server.
    script = subprocess.Popen(
        [str(CKPTKIT), "train", "--preset", "nope", "--output", str(tmp_path / "x")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
        cwd=ROOT,
    )
    log = tmp_path / "forked.log"
    argv = ["train", *CLI_ARGS, "--output", str(run_with_checkpoint), "--resume", "never"]
    forked = fork_server().wait(fork_server().start(log, *argv))
    assert_one_line_error(forked, log.read_text(), 2, "--overwrite")
    _, stderr = script.communicate(timeout=PROCESS_TIMEOUT)
    assert_one_line_error(script.returncode, stderr, 2, "unknown 'nope'")


def test_train_refuses_a_run_whose_checkpoints_are_all_damaged(
    cli: click.Group, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    run = copy_run(finished_run(tmp_path_factory.getbasetemp()), tmp_path / "run")
    damaged = sorted(p for p in run.iterdir() if p.name.startswith("step-"))
    for ckpt in damaged:
        (ckpt / "manifest.json").write_text("{")
    result = invoke(cli, "train", *CLI_ARGS, "--output", run)
    errors = [ln for ln in result.stderr.splitlines() if not ln.startswith("Warning: ")]
    assert_one_line_error(result.exit_code, "\n".join(errors), 4, "--resume never --overwrite")
    assert all(c.name in errors[0] for c in damaged), errors[0]
    assert "resume='never'" not in errors[0]  # the CLI names its own flags
    assert sorted(p for p in run.iterdir() if p.name.startswith("step-")) == damaged


def test_train_lock_message_names_break_lock(
    cli: click.Group, tmp_path: Path, run_with_checkpoint: Path
) -> None:
    lock = {"token": "t", "pid": 1, "host": "other-host", "heartbeat": time.time()}
    (run_with_checkpoint / ".lock").write_text(json.dumps(lock))
    result = invoke(cli, "train", *CLI_ARGS, "--output", run_with_checkpoint)
    assert_one_line_error(result.exit_code, result.stderr, 8, "--break-lock", "retry in")
    assert "wait 0 s" not in result.stderr and "break_lock=True" not in result.stderr
