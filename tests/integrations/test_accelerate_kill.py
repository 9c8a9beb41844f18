"""examples/accelerate_loop.py SIGKILLed at exact points (tests/killpoints.py) — in the
training between saves, inside ckptkit's commit before the manifest, before the rename —
then the same command again: the final weights equal an uninterrupted run's bit for bit.

One process on CPU: ``accelerate launch --cpu --num_processes 2`` runs one process anyway,
so the script runs directly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

import ckptkit  # noqa: E402
from tests.killpoints import command  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = str(ROOT / "examples" / "accelerate_loop.py")
STEPS, SAVE = 17, 5  # saves at 5, 10, 15 and the final 17; 5 batches an epoch


def _args(work: Path) -> list[str]:
    return ["--output", str(work / "run"), "--max-steps", str(STEPS), "--save-steps", str(SAVE)]


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), str(ROOT / "plugins"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "CKPTKIT_DISABLE_PLUGIN_AUTOLOAD": "1"}


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True)


def _killed(work: Path, point: str, nth: int) -> None:
    out = _run(command(point, nth, EXAMPLE, *_args(work)))
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]


def _finish(work: Path) -> str:
    out = _run([sys.executable, EXAMPLE, *_args(work)])
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _steps(work: Path) -> list[int]:
    return [c.step for c in ckptkit.CheckpointManager(str(work / "run"), readonly=True).list()]


def _final(work: Path) -> dict[str, torch.Tensor]:
    infos = ckptkit.CheckpointManager(str(work / "run"), readonly=True).list()
    assert infos and infos[-1].step == STEPS
    return ckptkit.load(infos[-1].url)


def _tmp_dirs(work: Path) -> list[Path]:
    return [p for p in (work / "run").iterdir() if p.name.startswith(".tmp-")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    work = tmp_path_factory.mktemp("straight")
    _finish(work)
    return _final(work)


def _same(final: dict, uninterrupted: dict) -> None:
    assert final["model"].keys() == uninterrupted["model"].keys()
    for k in final["model"]:
        assert torch.equal(final["model"][k], uninterrupted["model"][k]), k
    assert final["custom_checkpoint_0"] == uninterrupted["custom_checkpoint_0"]
    assert str(final["optimizer"]) == str(uninterrupted["optimizer"])


@pytest.mark.parametrize(
    ("point", "nth", "committed", "resumed_at"),
    [
        ("optimizer-step", 8, [5], 5),  # mid-epoch, between the saves at 5 and 10
        ("optimizer-step", 11, [5, 10], 10),  # the step right after a save
        ("commit-files", 2, [5], 5),  # inside the commit of step 10, before its manifest
        ("commit-rename", 3, [5, 10], 10),  # step 15 complete in its temp dir, not renamed
        ("commit-files", 1, [], None),  # inside the very first commit: a fresh start
    ],
)
def test_sigkill_then_same_command_matches_uninterrupted(
    tmp_path: Path,
    uninterrupted: dict,
    point: str,
    nth: int,
    committed: list[int],
    resumed_at: int | None,
) -> None:
    _killed(tmp_path, point, nth)
    assert _steps(tmp_path) == committed  # the kill landed where it was aimed
    if point.startswith("commit"):
        leftovers = _tmp_dirs(tmp_path)
        assert len(leftovers) == 1  # the interrupted commit's temp dir, invisible to readers
        has_manifest = (leftovers[0] / "manifest.json").exists()
        assert has_manifest == (point == "commit-rename")
    out = _finish(tmp_path)
    assert (f"resumed at step {resumed_at}" if resumed_at else "starting fresh") in out
    assert not _tmp_dirs(tmp_path)  # the next writer removed the leftover
    _same(_final(tmp_path), uninterrupted)


def test_killed_again_after_resuming_still_matches(tmp_path: Path, uninterrupted: dict) -> None:
    _killed(tmp_path, "commit-files", 2)  # dies committing step 10
    _killed(tmp_path, "optimizer-step", 7)  # resumed at 5, dies at step 12
    assert _steps(tmp_path) == [5, 10]
    assert "resumed at step 10" in _finish(tmp_path)
    _same(_final(tmp_path), uninterrupted)
