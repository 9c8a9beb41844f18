"""A removed checkpoint's large files are unlinked while held open and closed on a
thread (storage/freeing.py): the folder is gone when ``delete`` returns, the blocks come
back before the next large write, a forked child holds none of them, a kill frees them,
and nothing outside the folder is opened or followed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ckptkit import CheckpointManager
from ckptkit.storage import freeing
from ckptkit.storage.local import LocalStorage
from tests.oshelpers import in_fork, mounted_tmpfs

MB = 1 << 20


@pytest.fixture
def tmpfs(tmp_path: Path):
    """A 40 MiB tmpfs (it too frees an unlinked file's pages at its last close)."""
    with mounted_tmpfs(tmp_path / "fs", "size=40m") as mnt:
        yield Path(mnt)
        freeing.wait()


@pytest.fixture(autouse=True)
def drained():
    """Whatever a test left pending is closed, so no later wait() can block on it."""
    yield
    if freeing._pending or freeing._running:
        freeing._run()


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _held_fds() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.endswith("(deleted)") and "big" in target:
            out.append(target)
    return out


def test_a_rotation_never_needs_room_for_three_checkpoints(tmpfs: Path) -> None:
    """15 MB checkpoints on a 40 MiB disk, keep_last=1: each save needs the previous
    one plus itself. The one before must be freed before the next is written, though its
    blocks are freed off the save's thread."""
    state = {"w": torch.zeros(15 * MB // 4)}
    with CheckpointManager(str(tmpfs / "run"), run_name="r", keep_last=1, keep_best=0) as mgr:
        for step in range(1, 7):
            state["w"].fill_(float(step))
            mgr.save(step, state)
            assert [c.step for c in mgr.list()] == [step]
            names = sorted(n for n in os.listdir(tmpfs / "run") if n.startswith("step-"))
            assert names == [f"step-{step:012d}"]  # gone from the disk's listing at once
        mgr.wait()
        assert _free(tmpfs) > 20 * MB  # only the one checkpoint's space is taken
        restored = {"w": torch.zeros(15 * MB // 4)}
        mgr.restore(restored)
        assert torch.equal(restored["w"], state["w"])


def test_the_folder_is_gone_at_once_and_its_space_after_wait(
    tmpfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(freeing, "_start", lambda: None)  # closes stay pending
    storage = LocalStorage(str(tmpfs))
    storage.write_bytes("ckpt/big.bin", b"x" * (12 * MB))
    storage.write_bytes("ckpt/small.json", b"{}")
    before = _free(tmpfs)
    storage.delete("ckpt", recursive=True)
    assert not (tmpfs / "ckpt").exists()
    assert len(freeing._pending) == 1  # only the large file is held
    assert _free(tmpfs) < before + 2 * MB  # its pages are still allocated
    monkeypatch.undo()
    freeing._run()  # the closer's work, here
    assert _free(tmpfs) >= before + 11 * MB


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_holds_none_of_the_pending_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DataLoader worker forked while closes are pending would keep those blocks
    allocated for its whole life: the child closes its copies at once."""
    monkeypatch.setattr(freeing, "_start", lambda: None)  # closes stay pending
    storage = LocalStorage(str(tmp_path))
    storage.write_bytes("ckpt/big.bin", b"x" * (2 * MB))
    storage.delete("ckpt", recursive=True)
    assert len(_held_fds()) == 1

    def child() -> list[str]:
        freeing.wait()  # no closer thread in a child: must not block
        return _held_fds()

    report = in_fork(child)
    assert report == []
    monkeypatch.undo()
    freeing._run()
    assert _held_fds() == []


def test_links_fifos_and_outside_files_are_never_opened(tmp_path: Path) -> None:
    """Inside a removed folder a link to a large outside file is unlinked (the file is
    untouched and not held), a FIFO is removed without being opened (no hang)."""
    outside = tmp_path / "outside-big.bin"
    outside.write_bytes(b"y" * (3 * MB))
    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    (run / "ckpt" / "link").symlink_to(outside)
    os.mkfifo(run / "ckpt" / "fifo")
    storage = LocalStorage(str(run))
    storage.delete("ckpt", recursive=True)
    freeing.wait()
    assert not (run / "ckpt").exists()
    assert outside.read_bytes() == b"y" * (3 * MB)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="SIGKILL")
def test_a_kill_with_closes_pending_frees_the_space(tmpfs: Path) -> None:
    script = tmpfs.parent / "hold.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
            from ckptkit.storage import freeing
            from ckptkit.storage.local import LocalStorage
            freeing._start = lambda: None  # closes stay pending
            s = LocalStorage({str(tmpfs)!r})
            s.write_bytes("ckpt/big.bin", b"x" * (20 << 20))
            s.delete("ckpt", recursive=True)
            print("held", flush=True)
            time.sleep(600)
            """
        )
    )
    before = _free(tmpfs)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert _free(tmpfs) < before - 15 * MB  # deleted, but still held by the writer
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert _free(tmpfs) >= before - MB


def test_off_a_local_disk_files_are_unlinked_plainly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FUSE (a Drive mount) and NFS keep an unlinked open file as a hidden entry of its
    folder, which then could not be removed: there nothing is held open."""
    from ckptkit.storage import fsinfo

    monkeypatch.setattr(fsinfo, "fs_type", lambda fd: 0x65735546)  # FUSE_SUPER_MAGIC
    storage = LocalStorage(str(tmp_path))
    storage.write_bytes("ckpt/big.bin", b"x" * (2 * MB))
    storage.delete("ckpt", recursive=True)
    assert not (tmp_path / "ckpt").exists()
    assert freeing._pending == [] and _held_fds() == []
