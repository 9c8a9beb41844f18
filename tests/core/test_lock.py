"""The run lock: one writer per run, stale locks taken over, released on close."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from ckptkit import CheckpointManager, RunLockedError
from ckptkit.lock import LOCK, RunLock
from ckptkit.storage.local import LocalStorage


def _write_lock(run_dir: str, **info) -> None:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, LOCK), "w") as f:
        json.dump({"token": "someone-else", "heartbeat": time.time(), **info}, f)


def _lock_info(run_dir: str) -> dict:
    for _ in range(100):  # a heartbeat may be rewriting it right now
        with open(os.path.join(run_dir, LOCK)) as f:
            text = f.read()
        if text:
            return json.loads(text)
        time.sleep(0.01)
    raise AssertionError("the lock file stays empty")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_writer_fails_fast_naming_pid_and_host(run_dir):
    with CheckpointManager(run_dir):
        with pytest.raises(RunLockedError) as err:
            CheckpointManager(run_dir)
        message = str(err.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in message
        assert "break_lock=True" in message and "\n" not in message


def test_second_writer_in_another_process_is_refused(run_dir):
    code = (
        "import sys\n"
        "from ckptkit import CheckpointManager, RunLockedError\n"
        "try:\n"
        "    CheckpointManager(sys.argv[1])\n"
        "except RunLockedError as exc:\n"
        "    print(exc); sys.exit(8)\n"
    )
    with CheckpointManager(run_dir):
        proc = subprocess.run(
            [sys.executable, "-c", code, run_dir], capture_output=True, text=True, timeout=60
        )
    assert proc.returncode == 8, proc.stderr
    assert f"pid {os.getpid()}" in proc.stdout


def test_lock_is_released_on_close_and_on_error(run_dir):
    with CheckpointManager(run_dir):
        assert _lock_info(run_dir)["pid"] == os.getpid()
    assert not os.path.exists(os.path.join(run_dir, LOCK))
    with pytest.raises(ZeroDivisionError), CheckpointManager(run_dir):
        1 / 0  # noqa: B018
    with CheckpointManager(run_dir):  # free again
        pass


def test_stale_lock_of_a_dead_process_on_this_host_is_taken_over(run_dir):
    _write_lock(run_dir, pid=_dead_pid(), host=socket.gethostname())
    with CheckpointManager(run_dir):
        assert _lock_info(run_dir)["pid"] == os.getpid()


def test_live_process_on_this_host_keeps_its_lock_even_with_an_old_heartbeat(run_dir):
    _write_lock(run_dir, pid=os.getppid(), host=socket.gethostname(), heartbeat=0)
    with pytest.raises(RunLockedError, match=f"pid {os.getppid()}"):
        CheckpointManager(run_dir)


def test_other_host_lock_is_stale_only_when_its_heartbeat_stopped(run_dir):
    _write_lock(run_dir, pid=1, host="colab-vm-that-disconnected", heartbeat=time.time())
    with pytest.raises(RunLockedError, match="colab-vm-that-disconnected"):
        CheckpointManager(run_dir)
    _write_lock(run_dir, pid=1, host="colab-vm-that-disconnected", heartbeat=time.time() - 3600)
    with CheckpointManager(run_dir):
        assert _lock_info(run_dir)["host"] == socket.gethostname()


def test_break_lock_takes_a_live_lock(run_dir):
    _write_lock(run_dir, pid=os.getppid(), host=socket.gethostname())
    with CheckpointManager(run_dir, break_lock=True):
        assert _lock_info(run_dir)["pid"] == os.getpid()


def test_empty_lock_file_of_a_crashed_writer_is_stale(run_dir):
    os.makedirs(run_dir)
    open(os.path.join(run_dir, LOCK), "w").close()
    with CheckpointManager(run_dir):
        assert _lock_info(run_dir)["pid"] == os.getpid()


def test_readonly_manager_takes_no_lock(run_dir):
    os.makedirs(run_dir)
    with CheckpointManager(run_dir, readonly=True):
        assert not os.path.exists(os.path.join(run_dir, LOCK))


def test_heartbeat_refreshes_the_lock(run_dir):
    os.makedirs(run_dir)
    lock = RunLock(LocalStorage(run_dir), heartbeat=0.02)
    lock.acquire()
    try:
        first = _lock_info(run_dir)["heartbeat"]
        deadline = time.time() + 10
        while _lock_info(run_dir)["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.02)
        assert _lock_info(run_dir)["heartbeat"] > first
    finally:
        lock.release()
    assert not os.path.exists(os.path.join(run_dir, LOCK))


def test_lock_taken_over_is_not_rewritten_by_the_old_holder(run_dir):
    os.makedirs(run_dir)
    lock = RunLock(LocalStorage(run_dir), heartbeat=0.02)
    lock.acquire()
    _write_lock(run_dir, pid=12345, host="new-owner")
    deadline = time.time() + 10
    while lock.held and time.time() < deadline:
        time.sleep(0.02)
    assert not lock.held
    lock.release()
    assert _lock_info(run_dir)["host"] == "new-owner"  # neither rewritten nor deleted


def test_lock_with_our_pid_from_an_earlier_process_is_stale(run_dir):
    # A container restarted with the same hostname can hand the new process the old pid.
    _write_lock(run_dir, pid=os.getpid(), host=socket.gethostname(), process="earlier-boot")
    with CheckpointManager(run_dir) as mgr:
        assert mgr.save(1, {"x": 1}) is not None
    assert not os.path.exists(os.path.join(run_dir, LOCK))
