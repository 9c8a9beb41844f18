"""Full disk and other OS errors: a one-line StorageError, never a raw OSError, and a
checkpoint that committed is never reported as lost because cleanup after it failed.

The disk is real: a small tmpfs mounted for the test (we run as root in CI), filled
with a filler file (no space left) or with empty files (no inodes left), so the
errors come from the kernel, not from a mock. Where mounting is not allowed the
tmpfs tests are skipped; the rotation tests that need no mount raise a real
``OSError`` from a ``ckptkit_before_delete`` hook, a plugin at the storage boundary.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import warnings

import pytest
from click.testing import CliRunner

from ckptkit import CheckpointManager, CheckpointWarning, StorageError, hookimpl
from ckptkit.cli import _register_commands, cli
from ckptkit.hooks.manager import get_plugin_manager
from ckptkit.lock import LOCK, RunLock
from ckptkit.storage.local import LocalStorage
from tests.oshelpers import mounted_tmpfs

from .helpers import make_training


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs with 64 inodes, unmounted afterwards."""
    with mounted_tmpfs(tmp_path / "fs", "size=1m,nr_inodes=64") as mnt:
        yield mnt


def fill_space(mnt: str) -> str:
    """Write a filler file until the kernel says ENOSPC; returns its path."""
    path = os.path.join(mnt, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in (1 << 16, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * chunk)
    finally:
        os.close(fd)
    return path


def fill_inodes(mnt: str, leave: int) -> list[str]:
    """Create empty files until only ``leave`` inodes are free."""
    made = []
    while os.statvfs(mnt).f_ffree > leave:
        path = os.path.join(mnt, f"inode-{len(made)}")
        open(path, "w").close()
        made.append(path)
    return made


def small_state():
    return {"model": make_training()["model"]}


def run_files(run: str) -> list[str]:
    return sorted(os.listdir(run)) if os.path.isdir(run) else []


def test_lock_on_a_full_disk_is_a_storage_error_and_leaves_no_lock(small_fs):
    run = os.path.join(small_fs, "run")
    os.makedirs(run)
    fill_space(small_fs)
    with pytest.raises(StorageError) as err:
        CheckpointManager(run)
    message = str(err.value)
    assert "disk is full" in message and run in message and "\n" not in message
    assert LOCK not in run_files(run)  # no 0-byte lock left behind


def test_cli_on_a_full_disk_exits_7_with_one_line(small_fs, tmp_path):
    _register_commands()
    src = str(tmp_path / "src")
    with CheckpointManager(src) as mgr:
        mgr.save(1, small_state())
    run = os.path.join(small_fs, "run")
    os.makedirs(run)
    fill_space(small_fs)
    result = CliRunner().invoke(cli, ["convert", src, run])
    assert result.exit_code == 7, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "disk is full" in lines[0]
    assert "Traceback" not in result.output
    assert LOCK not in run_files(run)


def test_heartbeat_on_a_full_disk_never_truncates_the_lock(small_fs):
    run = os.path.join(small_fs, "run")
    lock = RunLock(LocalStorage(run), heartbeat=0.02)
    lock.acquire()
    try:
        fill_space(small_fs)
        for _ in range(20):  # many heartbeats, each failing for lack of space
            with open(os.path.join(run, LOCK)) as f:
                text = f.read()
            assert text, "a failed heartbeat left the lock empty: another writer would take it"
            assert '"token"' in text
            subprocess.run(["sleep", "0.02"], check=True)
    finally:
        os.unlink(os.path.join(small_fs, "filler"))
        lock.release()


def test_first_save_on_a_full_disk_raises_and_commits_nothing(small_fs):
    run = os.path.join(small_fs, "run")
    with CheckpointManager(run) as mgr:
        filler = fill_space(small_fs)
        # run.json is written first, before the commit: it is what fails, with nothing saved.
        with pytest.raises(StorageError, match=r"run\.json: the disk is full"):
            mgr.save(1, small_state())
        assert mgr.list() == []
        assert [n for n in run_files(run) if n != LOCK] == []  # no run.json, no temp dir
        os.unlink(filler)
        info = mgr.save(1, small_state())
        assert [c.name for c in mgr.list()] == [info.name]
    assert "run.json" in run_files(run)


def test_manifest_write_on_a_full_disk_raises_and_keeps_the_previous_checkpoint(small_fs):
    run = os.path.join(small_fs, "run")
    with CheckpointManager(run, keep_last=None) as mgr:
        first = mgr.save(1, small_state())
        # A save creates a temp directory and each state file, then the manifest: leave
        # inodes for everything but the manifest, so exactly its creation fails.
        state_files = len(os.listdir(os.path.join(run, first.name))) - 1
        made = fill_inodes(small_fs, leave=1 + state_files)
        with pytest.raises(StorageError, match="disk is full"):
            mgr.save(2, small_state())
        assert [c.name for c in mgr.list()] == [first.name]
        assert not [n for n in run_files(run) if n.startswith(".tmp-")]
        for path in made:
            os.unlink(path)
        mgr.save(2, small_state())
        assert [c.step for c in mgr.list()] == [1, 2]


def test_rotation_failing_on_a_busy_directory_returns_the_checkpoint_and_warns(small_fs):
    run = os.path.join(small_fs, "run")
    with CheckpointManager(run, keep_last=1, keep_best=0) as mgr:
        old = mgr.save(1, small_state())
        # A mount point inside the old checkpoint: rmdir fails with EBUSY, a real OS error.
        busy = os.path.join(run, old.name, "busy")
        os.mkdir(busy)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", busy], check=True)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                new = mgr.save(2, small_state())
        finally:
            subprocess.run(["umount", "-l", busy], check=False)
        assert new is not None and new.step == 2
        assert [c.name for c in mgr.list()] == [new.name]
        said = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
        assert any(new.name in s and old.name in s and "rotation" in s for s in said), said


class _FailingDelete:
    """A plugin whose delete hook hits an OS error, as a flaky network filesystem does."""

    @hookimpl
    def ckptkit_before_delete(self, manager, info):
        raise OSError(errno.EIO, "Input/output error", info.url)


def test_rotation_os_error_never_reports_a_committed_checkpoint_as_lost(run_dir):
    get_plugin_manager().register(_FailingDelete())
    with CheckpointManager(run_dir, keep_last=1, keep_best=0) as mgr:
        mgr.save(1, small_state())
        with pytest.warns(CheckpointWarning, match="rotation"):
            new = mgr.save(2, small_state())
        assert new is not None and new.step == 2
        assert mgr.latest().name == new.name


def test_an_undeletable_leftover_does_not_stop_a_run_from_opening(small_fs):
    run = os.path.join(small_fs, "run")
    leftover = os.path.join(run, ".tmp-step-000000000001-dead")  # an interrupted save's
    busy = os.path.join(leftover, "busy")
    os.makedirs(busy)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", busy], check=True)
    try:
        with pytest.warns(CheckpointWarning, match="leftover"), CheckpointManager(run) as mgr:
            info = mgr.save(1, small_state())
            assert mgr.latest().name == info.name
    finally:
        subprocess.run(["umount", "-l", busy], check=False)
    with CheckpointManager(run):  # the next writer removes it
        pass
    assert not os.path.exists(leftover)


def _remount(mnt: str, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", mnt], check=True)


def test_a_read_only_filesystem_is_one_storage_error(small_fs, tmp_path):
    run = os.path.join(small_fs, "run")
    os.makedirs(run)
    _remount(small_fs, "ro")
    try:
        with pytest.raises(StorageError, match="read-only") as err:
            CheckpointManager(run)
        assert "\n" not in str(err.value)
        _register_commands()
        src = str(tmp_path / "src")
        with CheckpointManager(src) as mgr:
            mgr.save(1, small_state())
        result = CliRunner().invoke(cli, ["convert", src, run])
        assert result.exit_code == 7 and "read-only" in result.stderr, result.output
    finally:
        _remount(small_fs, "rw")


def test_a_filesystem_turning_read_only_mid_run_fails_the_save_not_the_close(small_fs):
    run = os.path.join(small_fs, "run")
    mgr = CheckpointManager(run)
    first = mgr.save(1, small_state())
    _remount(small_fs, "ro")
    try:
        with pytest.raises(StorageError, match="read-only"):
            mgr.save(2, small_state())
        with pytest.warns(CheckpointWarning, match="run lock"):
            mgr.close()  # the lock cannot be removed: a warning, not a second error
    finally:
        _remount(small_fs, "rw")
    with CheckpointManager(run) as again:  # our lock, no longer held: taken over
        assert [c.name for c in again.list()] == [first.name]
