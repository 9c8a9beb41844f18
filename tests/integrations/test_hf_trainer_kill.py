"""examples/hf_trainer.py SIGKILLed mid-run, then the same command again: the final
weights equal an uninterrupted run's bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import ckptkit  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "hf_trainer.py"
STEPS, SAVE = 12, 4


def _command(work: Path) -> list[str]:
    return [
        sys.executable,
        str(EXAMPLE),
        "--output",
        str(work / "run"),
        "--work-dir",
        str(work / "out"),
        "--max-steps",
        str(STEPS),
        "--save-steps",
        str(SAVE),
    ]


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), str(ROOT / "plugins"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


def _final(work: Path) -> dict[str, torch.Tensor]:
    infos = ckptkit.CheckpointManager(str(work / "run"), readonly=True).list()
    assert infos and infos[-1].step == STEPS
    return ckptkit.load(infos[-1].url)["model"]


def _kill_when(work: Path, pattern: str) -> None:
    """Start the example and SIGKILL it as soon as a path matching ``pattern`` exists."""
    proc = subprocess.Popen(
        _command(work), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        while not any(work.glob(pattern)) and proc.poll() is None:
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    work = tmp_path_factory.mktemp("straight")
    subprocess.run(_command(work), env=_env(), check=True, capture_output=True)
    return _final(work)


@pytest.mark.parametrize(
    "where",
    [
        "out/checkpoint-8",  # inside the Trainer's own save of checkpoint-8
        "run/step-000000000004",  # right after a commit, inside the training between saves
    ],
)
def test_sigkill_then_same_command_matches_uninterrupted(
    tmp_path: Path, uninterrupted: dict[str, torch.Tensor], where: str
) -> None:
    _kill_when(tmp_path, where)
    assert not (tmp_path / "run" / f"step-{STEPS:012d}").exists()  # killed before the end
    subprocess.run(_command(tmp_path), env=_env(), check=True, capture_output=True)
    final = _final(tmp_path)
    assert final.keys() == uninterrupted.keys()
    for k in final:
        assert torch.equal(final[k], uninterrupted[k]), k


def _killed_at(work: Path, point: str, nth: int) -> None:
    """Run the example with ``point`` armed (tests/killpoints.py): it SIGKILLs itself
    exactly there, at its ``nth`` time, without any polling."""
    from tests.killpoints import command

    cmd = command(point, nth, str(EXAMPLE), *_command(work)[2:])
    out = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]


def _committed(work: Path) -> list[int]:
    return [c.step for c in ckptkit.CheckpointManager(str(work / "run"), readonly=True).list()]


def test_kill_inside_the_trainers_own_save_resumes_from_the_last_commit(
    tmp_path: Path, uninterrupted: dict[str, torch.Tensor]
) -> None:
    _killed_at(tmp_path, "hf-trainer-state", 2)  # writing checkpoint-8
    local = tmp_path / "out" / "checkpoint-8"
    assert (local / "model.safetensors").exists() and not (local / "trainer_state.json").exists()
    assert _committed(tmp_path) == [4]
    out = subprocess.run(_command(tmp_path), env=_env(), check=True, capture_output=True, text=True)
    assert "ckptkit-resume/checkpoint-4" in out.stdout  # the partial checkpoint-8 ignored
    final = _final(tmp_path)
    assert final.keys() == uninterrupted.keys()
    for k in final:
        assert torch.equal(final[k], uninterrupted[k]), k


@pytest.mark.parametrize("point", ["commit-files", "commit-rename"])
def test_kill_inside_ckptkits_commit_commits_the_complete_local_checkpoint_first(
    tmp_path: Path, uninterrupted: dict[str, torch.Tensor], point: str
) -> None:
    _killed_at(tmp_path, point, 2)  # committing step 8: checkpoint-8 is complete locally
    assert _committed(tmp_path) == [4]
    leftovers = [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1
    assert (leftovers[0] / "manifest.json").exists() == (point == "commit-rename")
    assert (tmp_path / "out" / "checkpoint-8" / "trainer_state.json").exists()
    out = subprocess.run(_command(tmp_path), env=_env(), check=True, capture_output=True, text=True)
    assert "ckptkit-resume/checkpoint-8" in out.stdout  # committed on resume, then resumed
    assert 8 in _committed(tmp_path)
    final = _final(tmp_path)
    assert final.keys() == uninterrupted.keys()
    for k in final:
        assert torch.equal(final[k], uninterrupted[k]), k
