"""``async_save=True`` in real processes: a SIGKILL during the background write leaves the
previous checkpoint as latest and takes the writer with it; SIGTERM's save is committed
before exit 75; interpreter exit finishes a save in flight, or says why it failed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckptkit import EXIT_RESUMABLE, CheckpointManager

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SCRIPT = Path(__file__).with_name("async_script.py")
TIMEOUT = 120.0


def start(mode: str, run: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "CKPTKIT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), mode, str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, which a test may signal whole
    )


def read_until(proc: subprocess.Popen[str], *markers: str) -> dict[str, str]:
    """Lines of ``proc`` until every marker has appeared; {marker: the rest of its line}."""
    seen: dict[str, str] = {}
    deadline = time.monotonic() + TIMEOUT
    assert proc.stdout is not None
    while set(markers) - set(seen):
        line = proc.stdout.readline()
        if not line:
            _, err = proc.communicate(timeout=TIMEOUT)
            raise AssertionError(f"exited {proc.returncode} before {markers}; seen {seen}\n{err}")
        word, _, rest = line.strip().partition(" ")
        seen.setdefault(word, rest)
        assert time.monotonic() < deadline, f"no {markers} in {TIMEOUT} s"
    return seen


def gone(pid: int) -> bool:
    """Dead or a zombie (a container's init may not reap orphans at once)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def steps(run: Path) -> list[int]:
    with CheckpointManager(str(run), readonly=True) as reader:
        return [c.step for c in reader.list()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork writer is Linux-only")
def test_sigkill_during_an_async_save_kills_its_writer_and_keeps_the_previous_latest(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    proc = start("kill", run)
    seen = read_until(proc, "WRITER", "TRAINING")
    writer = int(seen["WRITER"])
    assert writer != proc.pid, "the local async save did not fork a writer"
    assert any(n.startswith(".tmp-step-000000000002") for n in os.listdir(run))
    proc.kill()
    proc.communicate(timeout=TIMEOUT)
    deadline = time.monotonic() + 30
    while not gone(writer) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(writer), f"the writer {writer} outlived its killed parent"
    time.sleep(0.5)  # a surviving writer would commit now
    assert steps(run) == [1]

    # The next process takes the run over (the dead parent's lock is stale), removes the
    # interrupted commit and resumes from step 1.
    state = {"model": torch.nn.Linear(64, 64), "step": 0}
    with CheckpointManager(str(run), async_save=True) as mgr:
        assert not any(n.startswith(".tmp-") for n in os.listdir(run))
        assert mgr.resume(state) == 1 and state["step"] == 1
        mgr.save(2, state)
    assert steps(run) == [1, 2]


@pytest.mark.parametrize("whole_group", [False, True], ids=["process", "process group"])
def test_sigterm_saves_commits_that_save_and_exits_75(tmp_path: Path, whole_group: bool) -> None:
    """Also when the whole job is signalled (SLURM, Ctrl+C): the writer ignores it."""
    run = tmp_path / "run"
    proc = start("sigterm", run)
    read_until(proc, "STEP")
    if whole_group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == EXIT_RESUMABLE, f"{out}\n{err}"
    stop = [line for line in out.splitlines() if line.startswith("STOP ")]
    assert stop, out
    stopped_at = int(stop[-1].split()[1])
    assert steps(run)[-1] == stopped_at, f"the signal's save at {stopped_at} is not committed"


def test_interpreter_exit_finishes_a_save_in_flight(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = start("exit", run)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0 and "RETURNED" in out, err
    assert steps(run) == [1]


def test_interpreter_exit_reports_a_failed_save_in_flight(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = start("exit-fail", run)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert "RETURNED" in out, err
    assert "injected failure" in err and "ckptkit: error" in err, err
    assert "Traceback" not in err, err
    assert steps(run) == []
