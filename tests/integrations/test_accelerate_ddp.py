"""The accelerate example on two real processes (torchrun, gloo on CPU): every process's
RNG is saved, all restore, and a stop/resume ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

import ckptkit  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "accelerate_loop.py")
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))


def _run(url: str, steps: int, procs: int = 2) -> subprocess.CompletedProcess[str]:
    path = os.pathsep.join([str(ROOT), str(ROOT / "plugins"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "CKPTKIT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    args = [EXAMPLE, "--output", url, "--max-steps", str(steps), "--save-steps", "5"]
    if procs > 1:
        cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={procs}", *args]
    else:
        cmd = [sys.executable, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _last(url: str) -> dict:
    return ckptkit.load(ckptkit.CheckpointManager(url, readonly=True).list()[-1].url)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
def test_two_processes_stop_and_resume_bit_identical(tmp_path: Path) -> None:
    straight, stopped = str(tmp_path / "a"), str(tmp_path / "b")
    for url, steps in ((straight, 8), (stopped, 4), (stopped, 8)):
        out = _run(url, steps)
        assert out.returncode == 0, out.stderr[-3000:]  # torchrun returns: both workers exited
    assert out.stdout.count("resumed at step 4") == 2  # both processes restored
    a, b = _last(straight), _last(stopped)
    assert len(a["rng"]["ranks"]) == 2  # every process's RNG
    assert a["dataloader"]["length"] == 3  # 40 samples, batch 8, 2 processes
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k

    # The data position is per world size: one process is refused, naming the fix.
    out = _run(stopped, 12, procs=1)
    assert out.returncode != 0
    assert "same dataset, batch size and number of processes" in out.stderr
