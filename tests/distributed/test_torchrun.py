"""ckptkit under torchrun (gloo on CPU): per-rank state, errors on every rank, kill and
resume bit for bit, a sharded (FSDP2 through DCP) save restored at another world size."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import ckptkit
from ckptkit.cli import _register_commands, cli

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "ddp_loop.py")
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow  # each test starts torchrun (2 processes importing torch)


def torchrun(n: int, *args: str, tmp: Path, kill: str = "") -> subprocess.CompletedProcess[str]:
    pids = tmp / "pids"
    shutil.rmtree(pids, ignore_errors=True)
    pids.mkdir(parents=True)
    env = {**os.environ, "CKPTKIT_TEST_PIDS": str(pids), "CKPTKIT_TEST_KILL": kill}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE / "killpoint"), str(ROOT), env.get("PYTHONPATH", "")]
    )
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", str(n), *args]
    # A session of its own: the kill point SIGKILLs this process group (the whole job).
    proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"torchrun hung:\n{out[-3000:]}") from None
    assert_workers_gone(pids, out)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def assert_workers_gone(pids: Path, out: str) -> None:
    """No worker outlives its job (a kill of torchrun alone would leave them running)."""
    workers = [int(p.read_text()) for p in pids.iterdir()]
    assert workers, out[-3000:]
    deadline = time.monotonic() + 30
    alive = workers
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in workers if _running(pid)]
        time.sleep(0.2)
    assert not alive, f"leftover worker processes {alive}:\n{out[-2000:]}"


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


def same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b) and a.dtype == b.dtype
    return type(a) is type(b) and a == b


def test_every_rank_saves_its_rng_waits_for_the_commit_and_hears_of_errors(tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    ok(torchrun(2, str(HERE / "scenarios.py"), str(run), str(out), tmp=tmp_path))
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for seen in ranks:
        assert seen["saved"] == "step-000000000001" and seen["restored"] == 1
        assert seen["rng_back"] and seen["loader_batch"] == 1
        assert seen["error"] == "ConfigError"  # rank 0's error, raised on rank 1 too
    assert ranks[0]["draws"] != ranks[1]["draws"]  # each rank got its own RNG back
    assert ranks[1]["timeout"] == "StorageError" and ranks[1]["waited"] < 60
    assert ranks[0]["alone"] == "ConfigError"
    saved = ckptkit.load(str(run))
    assert saved["ckptkit.ranks"]["world_size"] == 2
    assert len(saved["ckptkit.ranks"]["states"]["rng"]) == 2
    assert [c.step for c in ckptkit.CheckpointManager(str(run), readonly=True).list()] == [1]


def test_ddp_killed_mid_run_and_inside_the_commit_resumes_bit_identical(tmp_path: Path) -> None:
    args = [EXAMPLE, "--max-steps", "16", "--save-steps", "4", "--batch-size", "4"]
    ok(torchrun(2, *args, "--output", "whole", "--export", "whole.pt", tmp=tmp_path))
    whole = torch.load(tmp_path / "whole.pt")
    for kill in ("after-rename:2", "before-rename:3"):  # between saves; inside the commit
        run = f"run-{kill.split(':')[0]}"
        killed = torchrun(2, *args, "--output", run, tmp=tmp_path, kill=kill)
        assert killed.returncode != 0 and "done" not in killed.stdout, killed.stdout[-3000:]
        assert [c.step for c in ckptkit.CheckpointManager(str(tmp_path / run), readonly=True).list()] == [4, 8]  # fmt: skip
        again = ok(torchrun(2, *args, "--output", run, "--export", f"{run}.pt", tmp=tmp_path))
        assert "resumed at step 8" in again, again
        left = sorted(p.name for p in (tmp_path / run).iterdir())
        # No .tmp- leftover, no lock; step 8 (resumed from) is kept by retention.
        assert left == ["run.json", *(f"step-{s:012d}" for s in (8, 12, 16))], left
        assert same(torch.load(tmp_path / f"{run}.pt"), whole), kill
        assert same(ckptkit.load(str(tmp_path / run))["model"], ckptkit.load(str(tmp_path / "whole"))["model"])  # fmt: skip


def test_fsdp_save_restores_at_another_world_size(tmp_path: Path) -> None:
    args = [EXAMPLE, "--fsdp", "--output", "run", "--save-steps", "4"]
    ok(torchrun(2, *args, "--max-steps", "6", "--export", "at2.pt", tmp=tmp_path))
    out = ok(torchrun(1, *args, "--max-steps", "6", "--export", "at1.pt", tmp=tmp_path))
    assert "resumed at step 6" in out and "world_size=2 and resumes at world_size=1" in out
    assert same(torch.load(tmp_path / "at1.pt"), torch.load(tmp_path / "at2.pt"))  # 2 -> 1
    ok(torchrun(1, *args, "--max-steps", "8", "--export", "at1.pt", tmp=tmp_path))
    ok(torchrun(2, *args, "--max-steps", "8", "--export", "at2.pt", tmp=tmp_path))
    assert same(torch.load(tmp_path / "at2.pt"), torch.load(tmp_path / "at1.pt"))  # 1 -> 2
    run = str(tmp_path / "run")
    full = torch.load(tmp_path / "at1.pt")
    assert same(ckptkit.load(run)["app"]["model"], full["model"])  # full tensors, assembled
    _register_commands()
    runner = CliRunner()
    for command in (["verify", run], ["ls", run], ["inspect", run]):
        done = runner.invoke(cli, command)
        assert done.exit_code == 0, (command, done.output)
    shown = ckptkit.inspect(run)
    assert shown["step"] == 8 and shown["state"]["app"]["model"]["tensors"] == 4
