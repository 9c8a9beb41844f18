"""examples/lightning_loop.py SIGKILLed mid-run (inside ckptkit's commit, which is
Lightning's save, and between saves), then the same command again: the final weights
equal an uninterrupted run's bit for bit, from end-of-epoch and mid-epoch checkpoints
alike (the example's DataLoader saves its position; for a plain one Lightning's own
resume differs too: test_lightning.py::test_mid_epoch_resume_is_lightnings_own).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

import ckptkit  # noqa: E402
from tests.killpoints import command  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "lightning_loop.py"
STEPS, SAVE = 12, 2  # 4 batches an epoch: steps 4 and 8 end an epoch, 2, 6, 10 do not
Weights = dict[str, torch.Tensor]


def _args(work: Path) -> list[str]:
    return [
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


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, check=check)


def _final(work: Path) -> Weights:
    infos = ckptkit.CheckpointManager(str(work / "run"), readonly=True).list()
    assert infos and infos[-1].step == STEPS
    return ckptkit.load(infos[-1].url)["state_dict"]


def _same(a: Weights, b: Weights) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _example() -> object:
    spec = importlib.util.spec_from_file_location("lightning_loop", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Weights:
    work = tmp_path_factory.mktemp("straight")
    _run([sys.executable, str(EXAMPLE), *_args(work)])
    return _final(work)


@pytest.fixture(scope="module")
def lightning_alone(tmp_path_factory: pytest.TempPathFactory) -> Weights:
    """The example's training with Lightning's own CheckpointIO, in this process."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ex = _example()
    work = tmp_path_factory.mktemp("own")
    deterministic = torch.are_deterministic_algorithms_enabled()
    own = ModelCheckpoint(dirpath=str(work / "ckpt"), every_n_train_steps=SAVE)
    try:
        model = ex.train(STEPS, [], own, str(work))
    finally:
        torch.use_deterministic_algorithms(deterministic)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_adapter_changes_nothing_in_the_training(
    uninterrupted: Weights, lightning_alone: Weights
) -> None:
    assert _same(uninterrupted, lightning_alone)


@pytest.mark.parametrize(
    ("point", "nth", "resumes_at"),
    [
        # two commits a save (the top-1 file, then last.ckpt); 4 batches an epoch
        ("commit-files", 5, 4),  # inside step 6's top-1 commit: from 4 (an epoch end)
        ("commit-files", 6, 6),  # inside step 6's last.ckpt commit: from its top-1 (mid-epoch)
        ("commit-rename", 7, 6),  # step 8's manifest written, not yet renamed: from 6
        ("optimizer-step", 12, 10),  # in the training between saves: from 10 (mid-epoch)
    ],
)
def test_sigkill_then_same_command_matches_uninterrupted(
    tmp_path: Path, uninterrupted: Weights, point: str, nth: int, resumes_at: int
) -> None:
    killed = _run(command(point, nth, str(EXAMPLE), *_args(tmp_path)), check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    again = _run([sys.executable, str(EXAMPLE), *_args(tmp_path)])
    found = re.search(r"resuming from \S*step-0*(\d+)", again.stdout)
    assert found and int(found.group(1)) == resumes_at, again.stdout
    assert _same(_final(tmp_path), uninterrupted)
    assert not [n for n in os.listdir(tmp_path / "run") if n.startswith(".tmp-")]
    assert not (tmp_path / "out").exists()  # nothing written beside the run
