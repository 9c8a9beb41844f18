"""Honest status: `ls` marks as latest exactly what a resume would restore, `--resume
auto` never silently starts over a run whose checkpoints are all damaged, and lock
messages name the real situation and a fix that exists."""

from __future__ import annotations

import json
import os
import re
import socket
import time

import pytest
import torch
from click.testing import CliRunner

from ckptkit import CheckpointManager, CorruptCheckpointError, RunLockedError
from ckptkit.cli import _register_commands, cli
from ckptkit.lock import LOCK

from .helpers import flip_byte, truncate


@pytest.fixture(scope="module", autouse=True)
def commands():
    _register_commands()


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def _state(tag: int) -> dict:
    return {"weights": {"w": torch.full((4,), float(tag))}, "tag": tag}


def _save(run: str, *steps: int) -> list[str]:
    with CheckpointManager(run, keep_last=None) as mgr:
        return [mgr.save(s, _state(s)).name for s in steps]


def _tensor_file(run: str, name: str) -> str:
    folder = os.path.join(run, name)
    return os.path.join(folder, next(f for f in os.listdir(folder) if f != "manifest.json"))


def _ls_latest(run: str) -> list[str]:
    return [r["name"] for r in json.loads(invoke("ls", run, "--json").stdout) if r["latest"]]


def _restored(run: str) -> int | None:
    state = _state(-1)
    with CheckpointManager(run, readonly=True) as mgr:
        return mgr.restore(state)


# -- ls marks what latest() / a resume restores ---------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        "flip",
        "truncate",
        "empty manifest",
        "missing file",
        "bad manifest json",
    ],
)
def test_ls_latest_is_what_latest_and_restore_pick(run_dir, damage):
    names = _save(run_dir, 10, 20, 30)
    newest = names[-1]
    if damage == "flip":
        flip_byte(_tensor_file(run_dir, newest))
    elif damage == "truncate":
        truncate(_tensor_file(run_dir, newest))
    elif damage == "missing file":
        os.remove(_tensor_file(run_dir, newest))
    else:
        with open(os.path.join(run_dir, newest, "manifest.json"), "w") as f:
            f.write("" if damage == "empty manifest" else '{"format": "ckptkit/1", "step": ')
    with pytest.warns(UserWarning), CheckpointManager(run_dir, readonly=True) as mgr:
        latest = mgr.latest()
    assert latest is not None and latest.name == names[1]
    assert _ls_latest(run_dir) == [names[1]]
    with pytest.warns(UserWarning):
        assert _restored(run_dir) == 20
    rows = json.loads(invoke("ls", run_dir, "--json").stdout)
    assert {r["name"]: r["status"] for r in rows}[newest] != "complete"


def test_ls_says_what_it_checked(run_dir):
    _save(run_dir, 10, 20)
    result = invoke("ls", run_dir)
    assert result.exit_code == 0
    assert "hashes" in result.stderr and "sizes" in result.stderr
    rows = json.loads(invoke("ls", run_dir, "--json").stdout)
    assert [r["checked"] for r in rows] == ["sizes", "hash"]


# -- --resume auto on a run whose checkpoints are all damaged ---------------------


@pytest.mark.parametrize("damage", ["flip", "bad manifest"])
def test_resume_auto_refuses_when_every_committed_checkpoint_is_damaged(run_dir, damage):
    names = _save(run_dir, 10, 20)
    for name in names:
        if damage == "flip":
            flip_byte(_tensor_file(run_dir, name))
        else:
            with open(os.path.join(run_dir, name, "manifest.json"), "w") as f:
                f.write("{")
    with CheckpointManager(run_dir) as mgr:
        with pytest.warns(UserWarning), pytest.raises(CorruptCheckpointError) as err:
            mgr.resume(_state(0), "auto")
        message = str(err.value)
        assert all(name in message for name in names), message
        assert "resume='never'" in message and "overwrite=True" in message
        assert "\n" not in message
        # Nothing was deleted: the damaged checkpoints are still there to look at.
        assert all(os.path.isdir(os.path.join(run_dir, n)) for n in names)
        # The way out the message names works, and removes the damaged ones too.
        assert not mgr.resume(_state(0), "never", overwrite=True).resumed
        assert not any(os.path.exists(os.path.join(run_dir, n)) for n in names)
        mgr.save(5, _state(5))
    assert _restored(run_dir) == 5


def test_resume_auto_cleans_up_an_interrupted_first_save_and_starts_fresh(run_dir):
    os.makedirs(os.path.join(run_dir, "step-000000000010"))  # no manifest: never committed
    with open(os.path.join(run_dir, "step-000000000010", "state.pt"), "wb") as f:
        f.write(b"partial")
    os.makedirs(os.path.join(run_dir, ".tmp-step-000000000020-abcd"))
    with CheckpointManager(run_dir) as mgr:
        assert not mgr.resume(_state(0), "auto").resumed
    assert [n for n in os.listdir(run_dir) if n != "run.json"] == []


def test_resume_auto_falls_back_past_a_damaged_latest(run_dir):
    names = _save(run_dir, 10, 20)
    flip_byte(_tensor_file(run_dir, names[-1]))
    with CheckpointManager(run_dir) as mgr, pytest.warns(UserWarning, match=names[-1]):
        assert mgr.resume(_state(0), "auto") == 10


# -- lock messages ------------------------------------------------------------------


def test_second_manager_in_this_process_says_close_it_or_readonly(run_dir):
    with CheckpointManager(run_dir):
        for url in (run_dir, run_dir + "/", "file://" + run_dir, os.path.relpath(run_dir)):
            with pytest.raises(RunLockedError) as err:
                CheckpointManager(url)
            message = str(err.value)
            assert "this process already holds" in message, message
            assert "close() it or pass readonly=True" in message
            assert f"pid {os.getpid()}" not in message and "\n" not in message
        with CheckpointManager(run_dir, readonly=True) as reader:
            assert reader.list() == []
    with CheckpointManager(run_dir):  # closed: free again
        pass


def test_second_manager_through_a_symlink_is_the_same_run(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "link")
    with (
        CheckpointManager(str(real)),
        pytest.raises(RunLockedError, match="this process already holds"),
    ):
        CheckpointManager(str(tmp_path / "link"))


def _foreign_lock(run_dir: str, age: float, host: str) -> None:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, LOCK), "w") as f:
        json.dump(
            {"token": "t", "pid": 1, "host": host, "heartbeat": time.time() - age, "process": "p"},
            f,
        )


@pytest.mark.parametrize(
    ("host", "age"),
    [("other-host", 119.7), ("other-host", 0.0), ("other-host", -30.0), ("HERE", 500.0)],
)
def test_lock_message_never_says_wait_0_s_and_names_break_lock(run_dir, host, age):
    host = socket.gethostname() if host == "HERE" else host
    _foreign_lock(run_dir, age, host)  # pid 1 is alive on this host
    with pytest.raises(RunLockedError) as err:
        CheckpointManager(run_dir)
    message = str(err.value)
    assert "break_lock=True" in message and "--break-lock" not in message
    assert not re.search(r"wait -?0 s", message), message
    assert not re.search(r"-\d+ s ago", message), message
    if host == socket.gethostname():
        assert "wait" not in message  # a live local process never goes stale by waiting


def test_cli_lock_message_names_a_flag_the_command_has(run_dir, tmp_path):
    src = str(tmp_path / "src")
    _save(src, 1)
    _foreign_lock(run_dir, 0.0, "other-host")
    result = invoke("convert", src, run_dir)
    assert result.exit_code == 8
    assert "--break-lock" in result.stderr and "break_lock=True" not in result.stderr
    assert invoke("convert", src, run_dir, "--break-lock").exit_code == 0

    # `ckptkit train` takes the run lock too: its messages may name --break-lock.
    from ckptkit_timellm.commands import train_cmd

    assert "--break-lock" in {opt for p in train_cmd.params for opt in p.opts}


def test_train_maps_the_start_over_advice_to_its_own_flags():
    from ckptkit_timellm.commands import train_cmd

    from ckptkit.cli import cli_message

    advice = "pass resume='never', overwrite=True to delete them and start over"
    assert (
        cli_message(advice, train_cmd)
        == "pass --resume never --overwrite to delete them and start over"
    )
    # A command without those flags keeps the library's words: no flag that does not exist.
    assert cli_message(advice, cli.commands["ls"]) == advice
    assert cli_message("pass break_lock=True", cli.commands["convert"]) == "pass --break-lock"
    assert cli_message("pass trust=True (--trust)", cli.commands["ls"]) == "pass trust=True"
