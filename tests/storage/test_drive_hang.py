"""Drive: a mount that stops answering. When Colab's FUSE daemon hangs, every system call
on the mount blocks in the kernel. These tests put a real FUSE mount that never answers
(``tests/oshelpers.hung_fuse``) over the Drive root in the middle of a run, then check:
``save()``, ``wait()`` and ``close()`` raise a one-line StorageError saying Drive does
not answer within ``CKPTKIT_DRIVE_TIMEOUT`` (plus a little), nothing committed is lost,
and once the mount answers again the run resumes, the staged uploads replayed.

A daemon can also hang while a large file is being read: the Drive root is then a FUSE
mount that serves the run (``tests/oshelpers.serving_fuse``) and stops answering midway
through a checkpoint's file; every reader (restore, load, verify, a legacy ``.pt``) must
fail in bounded time too.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ckptkit import CheckpointManager, StorageError
from ckptkit.hooks.manager import reset_plugin_manager
from ckptkit.storage import drive as drive_mod
from ckptkit.storage.drive import ROOT_ENV
from ckptkit.storage.drive._answer import TIMEOUT_ENV
from tests.oshelpers import hung_fuse, serving_fuse

URL = "drive://T-L/runs/etth1"
LIMIT = 2.0  # CKPTKIT_DRIVE_TIMEOUT in these tests
BOUND = 25.0  # what a call may take at most, the limit and retries included
HUNG = r"does not answer \(it has not answered for \d+ s: a hung FUSE connection\).*remount"


@pytest.fixture(autouse=True)
def short_limit(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv(TIMEOUT_ENV, str(LIMIT))
    reset_plugin_manager()
    yield
    reset_plugin_manager()


def _state(value: float) -> dict:
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(value)
    return {"model": model}


def _bounded(fn, *args):  # type: ignore[no-untyped-def]
    """Run ``fn``; return (its error or None, seconds it took)."""
    started = time.monotonic()
    try:
        fn(*args)
    except StorageError as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


def _resume(expected_step: int) -> None:
    fresh = _state(0.0)
    with CheckpointManager(URL, keep_last=None) as mgr:
        assert mgr.restore(fresh) == expected_step
    assert torch.equal(fresh["model"].weight, torch.full((2, 3), float(expected_step)))


@pytest.mark.timeout(180)
def test_save_on_a_drive_that_stops_answering_fails_in_bounded_time(drive_root: Path) -> None:
    mgr = CheckpointManager(URL, keep_last=None)
    mgr.save(1, _state(1.0))
    mgr.wait()
    with hung_fuse(drive_root):
        error, took = _bounded(mgr.save, 2, _state(2.0))
        assert error is not None and took < BOUND, f"save() took {took:.1f} s"
        assert "\n" not in str(error)
        assert re.search(HUNG, str(error)), str(error)
        error, took = _bounded(mgr.wait)  # nothing was queued: nothing to wait for
        assert took < BOUND, f"wait() took {took:.1f} s"
        error, took = _bounded(mgr.close)
        assert took < BOUND, f"close() took {took:.1f} s"
    _resume(1)  # the mount answers again: nothing committed was lost


@pytest.mark.timeout(180)
def test_an_upload_stuck_on_a_hung_mount_is_reported_and_replays_later(
    drive_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, go = threading.Event(), threading.Event()
    real = drive_mod._copy_file
    armed: list[bool] = []

    def copy(src: str, dst: str) -> str:
        if armed:
            entered.set()
            assert go.wait(60)
        return real(src, dst)  # into the hung mount: blocks in the kernel

    monkeypatch.setattr(drive_mod, "_copy_file", copy)
    mgr = CheckpointManager(URL, keep_last=None)
    mgr.save(1, _state(1.0))
    mgr.wait()
    armed.append(True)
    mgr.save(2, _state(2.0))  # staged; its upload starts and waits for the hang
    assert entered.wait(30)
    with hung_fuse(drive_root):
        go.set()
        error, took = _bounded(mgr.wait)
        assert error is not None and took < BOUND, f"wait() took {took:.1f} s"
        assert re.search(HUNG, str(error)), str(error)
        armed.clear()
    # Answering again: the stuck copy failed (EIO) and is retried, or left staged.
    with contextlib.suppress(StorageError):
        mgr.close()
    _resume(2)


@pytest.mark.timeout(180)
def test_readers_of_a_hung_drive_get_a_one_line_error_and_exit_7(drive_root: Path) -> None:
    from click.testing import CliRunner

    import ckptkit
    from ckptkit.cli import _register_commands, cli

    with CheckpointManager(URL) as mgr:
        mgr.save(1, _state(1.0))
    _register_commands()
    with hung_fuse(drive_root):
        error, took = _bounded(ckptkit.load, URL)
        assert error is not None and re.search(HUNG, str(error)) and took < BOUND, took
        started = time.monotonic()
        result = CliRunner().invoke(cli, ["ls", URL])
        assert time.monotonic() - started < BOUND
        assert result.exit_code == 7, result.output
        assert re.search(HUNG, result.stderr) and result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.output
    _resume(1)


READERS = ["restore", "load", "verify", "legacy"]


def _wide(value: float) -> dict:
    model = torch.nn.Linear(1024, 1024, bias=False)  # a 4 MB file: read in many pieces
    with torch.no_grad():
        model.weight.fill_(value)
    return {"model": model}


def _check_weight(weight: torch.Tensor, value: float) -> None:
    assert torch.equal(weight, torch.full((1024, 1024), value))


@pytest.fixture
def served(drive_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A run saved at step 1 (weights 1.0) and a legacy ``.pt`` (2.0) on Drive, which
    is then read through a FUSE daemon mounted at the folder this yields (the Drive
    root meanwhile); the plain root again afterwards."""
    with CheckpointManager(URL, keep_last=None) as mgr:
        mgr.save(1, _wide(1.0))
    torch.save(_wide(2.0)["model"].state_dict(), drive_root / "T-L" / "legacy.pt")
    mnt = tmp_path / "mounted"
    mnt.mkdir()
    monkeypatch.setenv(ROOT_ENV, str(mnt))
    yield mnt
    monkeypatch.setenv(ROOT_ENV, str(drive_root))


def _read(reader: str) -> None:
    """Read the served run with ``reader``, checking what it read."""
    import ckptkit
    from ckptkit.cli import _register_commands, cli

    if reader == "restore":
        fresh = _wide(0.0)
        with CheckpointManager(URL, keep_last=None) as mgr:
            assert mgr.restore(fresh) == 1
        _check_weight(fresh["model"].weight, 1.0)
    elif reader == "load":
        _check_weight(ckptkit.load(URL)["model"]["weight"], 1.0)
    elif reader == "legacy":
        _check_weight(ckptkit.load("drive://T-L/legacy.pt")["model"]["weight"], 2.0)
    else:
        from click.testing import CliRunner

        _register_commands()
        result = CliRunner().invoke(cli, ["verify", URL])
        if result.exit_code == 7:  # the documented code of a StorageError
            raise StorageError(result.stderr.strip())
        assert result.exit_code == 0, result.output


@pytest.mark.timeout(180)
@pytest.mark.parametrize("reader", READERS)
def test_a_drive_that_hangs_midway_through_a_file_fails_its_reader_in_bounded_time(
    served: Path, drive_root: Path, monkeypatch: pytest.MonkeyPatch, reader: str
) -> None:
    with serving_fuse(drive_root, served, release_after=40) as fuse:
        fuse.hang_reads(".pt" if reader == "legacy" else ".safetensors", after=1 << 20)
        error, took = _bounded(_read, reader)
        assert error is not None and took < BOUND, f"{reader} took {took:.1f} s"
        assert "\n" not in str(error) and re.search(HUNG, str(error)), str(error)
        assert fuse.reads > 0, "it read the file through the mount, then the mount hung"
    monkeypatch.setenv(ROOT_ENV, str(drive_root))  # the plain folder: nothing was lost
    _resume_wide(1)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("reader", READERS)
def test_every_reader_reads_the_same_through_a_fuse_mount(
    served: Path, drive_root: Path, reader: str
) -> None:
    """The serving daemon itself: what the hang test reads works when nothing hangs."""
    with serving_fuse(drive_root, served) as fuse:
        _read(reader)
        assert fuse.reads > 0 and fuse.errors == []


def _resume_wide(expected_step: int) -> None:
    fresh = _wide(0.0)
    with CheckpointManager(URL, keep_last=None) as mgr:
        assert mgr.restore(fresh) == expected_step
    _check_weight(fresh["model"].weight, float(expected_step))
