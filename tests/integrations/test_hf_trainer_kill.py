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
