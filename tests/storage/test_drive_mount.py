"""Drive: a vanished mount is an error, never a silent local copy.

A Colab unmount leaves the Drive root missing, or an empty folder where the mount was.
The tests make the root vanish (rename it away, or put an empty folder in its place)
while an upload is in flight, then check: nothing is created at the root, the staged
copy is kept, ``save()``/``wait()``/``close()`` raise a one-line StorageError naming the
mount and the fix, ``ckptkit train`` exits non-zero, the next writer replays the staged
uploads once the mount is back, and a read-only open never replays or deletes anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ckptkit
from ckptkit import CheckpointManager, StorageError, hookimpl
from ckptkit.hooks.manager import get_plugin_manager, reset_plugin_manager
from ckptkit.storage import drive as drive_mod
from ckptkit.storage.drive import DriveStorage

ROOT = Path(__file__).resolve().parents[2]
URL = "drive://T-L/runs/etth1"
# What the error must say: which mount, and what to do about it.
MOUNT_ERROR = r"not mounted at .*MyDrive.*remount.*staged uploads .*replay"


@pytest.fixture(autouse=True)
def fresh_plugins() -> Iterator[None]:
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture
def staging(drive_root: Path, tmp_path: Path) -> Path:
    return tmp_path / "drive-staging"


def _state(value: float) -> dict:
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(value)
    return {"model": model}


def _staged(staging: Path) -> dict[str, bytes]:
    """Every staged upload (not journals or locks), by path below the staging folder."""
    return {
        str(p.relative_to(staging)): p.read_bytes() for p in staging.rglob("files/*") if p.is_file()
    }


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes ({} when it does not exist)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _steps_on_drive() -> list[int]:
    with CheckpointManager(URL, readonly=True) as mgr:
        return [c.step for c in mgr.list()]


class _Vanish:
    """Makes the Drive root vanish while an upload is in flight.

    ``mode``: ``removed`` (the root is renamed away, as when the mount point itself
    goes), ``emptied`` (an empty folder stays in its place, as an unmounted mount point
    often does) or ``after-copy`` (the root goes right after a copy landed, before it is
    verified). ``restore()`` puts the real root back (a remount).
    """

    def __init__(self, root: Path, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.away = root.with_name(root.name + "-unmounted")
        self.mode = mode
        self.armed = False
        self.entered = threading.Event()
        self.go = threading.Event()
        self.gone = threading.Event()
        self.real = drive_mod._copy_file
        monkeypatch.setattr(drive_mod, "_copy_file", self)

    def __call__(self, src: str, dst: str) -> str:
        if not self.armed:
            return self.real(src, dst)
        if self.mode == "after-copy":
            sha = self.real(src, dst)
            self.entered.set()
            assert self.go.wait(30)  # until save() returned
            self._vanish()
            return sha
        self.entered.set()
        assert self.go.wait(30)
        return self.real(src, dst)

    def _vanish(self) -> None:
        if not self.gone.is_set():
            self.root.rename(self.away)
            if self.mode == "emptied":
                self.root.mkdir()
            self.gone.set()

    def during_next_upload(self) -> None:
        """Arm: the next upload starts, the root vanishes, then the upload goes on."""
        self.armed = True

    def wait_gone(self) -> None:
        assert self.entered.wait(30), "no upload started"
        if self.mode != "after-copy":
            self._vanish()
        self.go.set()
        assert self.gone.wait(30)

    def nothing_at_root(self) -> bool:
        """Nothing was created where the root was (an empty folder left behind stays empty)."""
        return not self.root.exists() or (self.mode == "emptied" and not any(self.root.iterdir()))

    def restore(self, *, drop_lock: bool = True) -> None:
        """Remount. The run lock of the failed writer went away with the mount; a rerun is a
        new process, for which that lock is stale: here, in the same process, remove it."""
        self.armed = False
        self.go.set()
        assert self.nothing_at_root()
        if self.root.exists():
            self.root.rmdir()
        self.away.rename(self.root)
        if drop_lock:
            (self.root / "T-L/runs/etth1/.lock").unlink(missing_ok=True)


def _fail_mid_run(vanish: _Vanish) -> CheckpointManager:
    """A run that committed step 1 on Drive, then staged step 2 while the root vanished."""
    mgr = CheckpointManager(URL, keep_last=None)
    mgr.save(1, _state(1.0))
    mgr.wait()
    vanish.during_next_upload()
    mgr.save(2, _state(2.0))  # returns at once: the upload is in flight
    vanish.wait_gone()
    return mgr


MODES = ["removed", "emptied", "after-copy"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_vanished_root_is_an_error_and_nothing_is_written_there(
    mode: str, drive_root: Path, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vanish = _Vanish(drive_root, mode, monkeypatch)
    mgr = _fail_mid_run(vanish)
    with pytest.raises(StorageError, match=MOUNT_ERROR):
        mgr.wait()
    with pytest.raises(StorageError, match=MOUNT_ERROR):
        mgr.save(3, _state(3.0))
    staged = _staged(staging)
    assert staged, "the staged copy of step 2 was deleted before it reached Drive"
    with pytest.raises(StorageError, match=MOUNT_ERROR) as failed:
        mgr.close()
    assert "\n" not in str(failed.value)
    assert vanish.nothing_at_root()
    assert _staged(staging) == staged  # kept for the replay
    # The real Drive still ends at step 1: step 2 is not committed there.
    on_drive = _tree(vanish.away / "T-L/runs/etth1")
    assert "step-000000000001/manifest.json" in on_drive
    assert "step-000000000002/manifest.json" not in on_drive


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_remount_then_next_writer_replays_the_staged_uploads(
    mode: str, drive_root: Path, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vanish = _Vanish(drive_root, mode, monkeypatch)
    mgr = _fail_mid_run(vanish)
    with pytest.raises(StorageError, match=MOUNT_ERROR):
        mgr.close()
    vanish.restore()  # the user remounts Drive
    assert _steps_on_drive() == [1]
    with CheckpointManager(URL, keep_last=None) as again:  # the rerun
        assert again.latest().step == 2
        state = _state(0.0)
        assert again.restore(state) == 2
        assert float(state["model"].weight.detach()[0, 0]) == 2.0
    assert _steps_on_drive() == [1, 2]
    assert _staged(staging) == {}


@pytest.mark.timeout(120)
def test_remount_in_the_same_process_lets_wait_finish(
    drive_root: Path, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vanish = _Vanish(drive_root, "emptied", monkeypatch)
    mgr = _fail_mid_run(vanish)
    with pytest.raises(StorageError, match=MOUNT_ERROR):
        mgr.wait()
    vanish.restore(drop_lock=False)
    mgr.wait()  # the same queue goes on, onto the real Drive
    mgr.save(3, _state(3.0))
    mgr.close()
    assert _steps_on_drive() == [1, 2, 3]
    assert _staged(staging) == {}


@pytest.mark.timeout(120)
def test_another_drive_in_its_place_is_refused(
    drive_root: Path, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A root with another marker (another account's Drive, or another run's root) is
    not where the staged uploads belong."""
    vanish = _Vanish(drive_root, "removed", monkeypatch)
    mgr = _fail_mid_run(vanish)
    with pytest.raises(StorageError, match=MOUNT_ERROR):
        mgr.close()
    drive_root.mkdir()
    (drive_root / drive_mod.MARKER).write_text("another-drive\n")
    with pytest.raises(StorageError, match=r"not mounted at .*MyDrive.*remount"):
        CheckpointManager(URL)
    assert sorted(p.name for p in drive_root.rglob("*")) == [drive_mod.MARKER]
    assert _staged(staging)


def test_a_copy_on_another_filesystem_is_not_the_mount(
    drive_root: Path, staging: Path, tmp_path: Path
) -> None:
    """The root swapped (here by a symlink) for a local copy holding the same marker:
    within a process, the root's filesystem must stay the one it was."""
    elsewhere = Path("/dev/shm")
    if not elsewhere.is_dir() or elsewhere.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a filesystem other than the test's")
    copy = elsewhere / f"ckptkit-test-{os.getpid()}-{tmp_path.name}"
    with CheckpointManager(URL, keep_last=None) as mgr:
        mgr.save(1, _state(1.0))
        mgr.wait()
        shutil.copytree(drive_root, copy, symlinks=True)
        try:
            drive_root.rename(drive_root.with_name("MyDrive-unmounted"))
            drive_root.symlink_to(copy)
            before = _tree(copy)
            with pytest.raises(StorageError, match=MOUNT_ERROR):
                mgr.save(2, _state(2.0))
            assert _tree(copy) == before
            drive_root.unlink()
            drive_root.with_name("MyDrive-unmounted").rename(drive_root)
        finally:
            shutil.rmtree(copy, ignore_errors=True)
    assert _steps_on_drive() == [1]


def test_a_missing_root_is_never_created(drive_root: Path, staging: Path) -> None:
    st = DriveStorage(URL, attempts=2, backoff=0.01)
    st.write_bytes("a", b"1")
    st.flush()
    drive_root.rename(drive_root.with_name("gone"))
    with pytest.raises(StorageError, match=MOUNT_ERROR):
        st.create_exclusive(".lock", b"x")  # the run lock goes to Drive directly
    with pytest.raises(StorageError, match=MOUNT_ERROR):
        st.write_bytes("b", b"2")
    st.close()  # nothing queued: nothing to report
    assert not drive_root.exists()


def test_a_new_process_refuses_the_empty_folder_left_by_an_unmount(
    drive_root: Path, staging: Path
) -> None:
    """The marker the backend keeps in the root tells the real Drive from an empty
    folder, also in a later process that has nothing left to upload."""
    with CheckpointManager(URL) as mgr:
        mgr.save(1, _state(1.0))
    drive_root.rename(drive_root.with_name("gone"))
    drive_root.mkdir()
    with pytest.raises(StorageError, match=r"not mounted at .*MyDrive.*remount"):
        CheckpointManager(URL)
    assert _tree(drive_root) == {}


def test_readers_of_a_run_say_the_mount_is_gone(drive_root: Path, staging: Path) -> None:
    """Where this machine's staging knows the run, reading the empty folder an unmount
    left says so, instead of showing an empty run."""
    from ckptkit.cli import _register_commands, cli

    with CheckpointManager(URL) as mgr:
        mgr.save(1, _state(1.0))
    drive_root.rename(drive_root.with_name("MyDrive-unmounted"))
    drive_root.mkdir()
    staged_before = _tree(staging)
    with pytest.raises(StorageError, match=r"not mounted at .*MyDrive.*remount"):
        ckptkit.load(URL)
    with pytest.raises(StorageError, match=r"not mounted at .*MyDrive.*remount"):
        CheckpointManager(URL, readonly=True)
    _register_commands()
    result = CliRunner().invoke(cli, ["ls", URL])
    assert result.exit_code == 7 and "not mounted" in result.stderr, result.output
    assert _tree(staging) == staged_before
    assert list(drive_root.iterdir()) == []


def test_another_run_on_the_same_root_refuses_the_empty_folder_too(
    drive_root: Path, staging: Path
) -> None:
    """The marker belongs to the root, not to a run: after an unmount, a new run on this
    machine does not start on the empty folder left behind either."""
    with CheckpointManager(URL) as mgr:
        mgr.save(1, _state(1.0))
    drive_root.rename(drive_root.with_name("MyDrive-unmounted"))
    drive_root.mkdir()
    other = "drive://T-L/runs/another"
    with pytest.raises(StorageError, match=r"not mounted at .*MyDrive.*remount"):
        CheckpointManager(other)
    with pytest.raises(StorageError, match=r"not mounted at .*MyDrive.*remount"):
        ckptkit.load(other)
    assert list(drive_root.iterdir()) == []


@pytest.mark.timeout(120)
def test_a_reader_in_the_writers_process_does_not_wait_for_its_uploads(
    drive_root: Path, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It sees the writer's queued checkpoint, and its close() is not held up by (nor
    made to fail with) the writer's uploads, here stuck."""
    gate = threading.Event()
    real = drive_mod._copy_file

    def stuck(src: str, dst: str) -> str:
        if not gate.wait(5):
            raise OSError(5, "Input/output error", dst)
        return real(src, dst)

    with CheckpointManager(URL, keep_last=None) as mgr:
        mgr.save(1, _state(1.0))
        mgr.wait()
        monkeypatch.setattr(drive_mod, "_copy_file", stuck)
        mgr.save(2, _state(2.0))
        reader = CheckpointManager(URL, readonly=True)
        assert [c.step for c in reader.list()] == [1, 2]  # step 2 from the writer's queue
        reader.close()
        assert mgr.storage.pending()  # the reader did not wait for the upload
        gate.set()
    assert _steps_on_drive() == [1, 2]


def test_readonly_opens_neither_replay_nor_delete(
    drive_root: Path, staging: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckptkit.cli import _register_commands, cli

    # Leave step 2 staged, as a writer that lost Drive (or died) does: its uploads fail.
    failing = [False]
    real = drive_mod._copy_file

    def copy(src: str, dst: str) -> str:
        if failing[0]:
            raise OSError(5, "Input/output error", dst)
        return real(src, dst)

    monkeypatch.setattr(drive_mod, "_copy_file", copy)
    holder = DriveStorage(URL, attempts=1, backoff=0)  # the run's queue: one try per round
    holder.write_bytes("notes.txt", b"x")
    mgr = CheckpointManager(URL, keep_last=None)
    mgr.save(1, _state(1.0))
    mgr.wait()
    failing[0] = True
    mgr.save(2, _state(2.0))
    with pytest.raises(StorageError):
        mgr.close()
    with pytest.raises(StorageError):
        holder.close()
    failing[0] = False
    staged_before = _tree(staging)  # journals and locks too
    drive_before = _tree(drive_root)
    assert _staged(staging)

    def cli_ok(*args: str) -> None:
        result = CliRunner().invoke(cli, list(args))
        assert result.exit_code == 0, result.output + result.stderr

    _register_commands()
    readers: list[Callable[[], object]] = [
        lambda: _steps_on_drive(),
        lambda: ckptkit.load(URL),
        lambda: ckptkit.inspect(URL),
        lambda: DriveStorage(URL).listdir(""),
        lambda: cli_ok("ls", URL),
        lambda: cli_ok("inspect", URL),
        lambda: cli_ok("verify", URL),
    ]
    for read in readers:
        read()
        assert _tree(staging) == staged_before
        assert _tree(drive_root) == drive_before
    assert _steps_on_drive() == [1]  # what Drive holds; the writer replays step 2


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ckptkit_train_exits_non_zero_when_the_mount_vanishes(
    drive_root: Path, staging: Path
) -> None:
    from tests.timellm.train_script import CLI_ARGS, assert_one_line_error, timellm_cli

    away = drive_root.with_name("MyDrive-unmounted")

    class Unmount:
        @hookimpl
        def ckptkit_after_save(self, manager, info) -> None:
            if info.step == 4:  # the first checkpoint: staged, its upload queued
                drive_root.rename(away)

    with timellm_cli() as group:
        get_plugin_manager().register(Unmount())
        result = CliRunner().invoke(group, ["train", *CLI_ARGS, "--output", URL])
    assert_one_line_error(result.exit_code, result.stderr, 7, "not mounted", "remount")
    assert not drive_root.exists()
    assert _staged(staging)
    away.rename(drive_root)  # remount; the lock is stale for a new process (see _Vanish)
    (drive_root / "T-L/runs/etth1/.lock").unlink()
    with timellm_cli() as group:
        result = CliRunner().invoke(group, ["train", *CLI_ARGS, "--output", URL])
    assert result.exit_code == 0, result.output + result.stderr
    assert "resumed at step 4" in result.output
    assert _steps_on_drive()[-1] == 12
    assert _staged(staging) == {}


@pytest.mark.slow
def test_a_script_exits_non_zero_and_keeps_its_staging(drive_root: Path, staging: Path) -> None:
    """A plain training script: the mount goes (an empty folder stays) while step 2 is
    being uploaded; the process must fail, and keep step 2 staged."""
    script = textwrap.dedent(
        """
        import os, torch
        from ckptkit import CheckpointManager
        from ckptkit.storage import drive
        root = os.environ["CKPTKIT_DRIVE_ROOT"]
        real, armed = drive._copy_file, []
        def unmount_then_copy(src, dst):
            if armed and not os.path.exists(root + "-unmounted"):
                os.rename(root, root + "-unmounted")
                os.mkdir(root)
            return real(src, dst)
        drive._copy_file = unmount_then_copy
        with CheckpointManager("drive://T-L/runs/etth1") as mgr:
            mgr.save(1, {"w": torch.ones(2)})
            mgr.wait()
            armed.append(True)
            mgr.save(2, {"w": torch.ones(2)})
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, timeout=120, capture_output=True, text=True
    )
    assert proc.returncode != 0, proc.stderr
    assert "StorageError" in proc.stderr and "remount" in proc.stderr
    assert list(drive_root.iterdir()) == []
    assert _staged(staging)
    on_drive = _tree(drive_root.with_name("MyDrive-unmounted") / "T-L/runs/etth1")
    assert "step-000000000001/manifest.json" in on_drive
    assert "step-000000000002/manifest.json" not in on_drive


@pytest.mark.slow
def test_next_writer_finishes_the_replay_before_it_resumes(
    drive_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that adopts a dead one's staged uploads finishes them before it lists or
    restores: a resume never starts from a checkpoint that lives only in local staging."""
    script = textwrap.dedent(
        """
        import os, torch
        from ckptkit import CheckpointManager
        from ckptkit.storage import drive
        def down(src, dst):
            raise OSError(5, "Drive disconnected")
        drive._copy_file = down
        mgr = CheckpointManager("drive://T-L/runs/replay", keep_last=None)
        mgr.save(1, {"model": torch.nn.Linear(2, 2), "step": 1})
        os._exit(0)  # a Colab runtime restart: uploads still staged
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")])}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    on_drive = drive_root / "T-L" / "runs" / "replay" / "step-000000000001"
    assert not (on_drive / "manifest.json").exists()
    real_copy = drive_mod._copy_file

    def slow_copy(src: str, dst: str) -> str:
        time.sleep(0.3)  # a slow Drive: the replay is not done by the time we look
        return real_copy(src, dst)

    monkeypatch.setattr(drive_mod, "_copy_file", slow_copy)
    with CheckpointManager("drive://T-L/runs/replay") as mgr:
        assert (on_drive / "manifest.json").exists(), "resuming before the replay is on Drive"
        state = {"model": torch.nn.Linear(2, 2), "step": 0}
        assert mgr.resume(state).step == 1
