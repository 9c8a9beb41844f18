"""examples/lightning_loop.py SIGKILLed mid-run (inside ckptkit's commit, which is
Lightning's save, and between saves), then the same command again.

Lightning does not resume exactly from a checkpoint taken mid-epoch (it does not store
a plain DataLoader's position), so the final weights are compared, bit for bit, with
what Lightning's own resume (its TorchCheckpointIO, no ckptkit) from the same step
gives, and the test shows that one differs from an uninterrupted run. From a checkpoint
at an epoch boundary both equal the uninterrupted run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

import ckptkit  # noqa: E402

from ._lightning_kill import command  # noqa: E402

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
def lightning_own(
    tmp_path_factory: pytest.TempPathFactory, uninterrupted: Weights
) -> Callable[[int], Weights]:
    """Lightning alone, in this process: ``resume(step)`` is the final weights of its own
    resume from its own checkpoint at ``step``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ex = _example()
    work = tmp_path_factory.mktemp("own")
    deterministic = torch.are_deterministic_algorithms_enabled()
    own = ModelCheckpoint(dirpath=str(work / "ckpt"), every_n_train_steps=SAVE, save_top_k=-1)
    try:
        model = ex.train(STEPS, [], own, str(work))
        # The adapter changes nothing in the training: a run through it is Lightning's.
        assert _same({k: v.detach() for k, v in model.state_dict().items()}, uninterrupted)
        cache: dict[int, Weights] = {}

        def resume(step: int) -> Weights:
            if step not in cache:
                (path,) = (work / "ckpt").glob(f"epoch=*-step={step}.ckpt")
                fresh = ModelCheckpoint(dirpath=str(work / f"again{step}"), save_top_k=0)
                model = ex.train(STEPS, [], fresh, str(work), ckpt_path=str(path))
                cache[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return cache[step]

        yield resume
    finally:
        torch.use_deterministic_algorithms(deterministic)


@pytest.mark.parametrize(
    ("point", "nth", "resumes_at"),
    [
        ("commit-files", 5, 4),  # inside the 5th commit (top-1 file at step 6): from 4
        ("commit-files", 6, 6),  # inside last.ckpt's commit at step 6: from the top-1 one
        ("commit-rename", 7, 6),  # manifest written, not yet renamed (step 8): from 6
        ("optimizer-step", 10, 8),  # in the training between saves: from 8
    ],
)
def test_sigkill_then_same_command_resumes_as_lightning_does(
    tmp_path: Path,
    uninterrupted: Weights,
    lightning_own: Callable[[int], Weights],
    point: str,
    nth: int,
    resumes_at: int,
) -> None:
    killed = _run(command(point, nth, str(EXAMPLE), *_args(tmp_path)), check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    again = _run([sys.executable, str(EXAMPLE), *_args(tmp_path)])
    found = re.search(r"resuming from \S*step-0*(\d+)", again.stdout)
    assert found and int(found.group(1)) == resumes_at, again.stdout
    final = _final(tmp_path)
    if resumes_at % 4 == 0:  # an epoch boundary: exact
        assert _same(final, uninterrupted)
    else:
        # Lightning's own resume from the same step differs from the uninterrupted run
        # (mid-epoch), and ckptkit's resume is exactly Lightning's.
        assert not _same(lightning_own(resumes_at), uninterrupted)
        assert _same(final, lightning_own(resumes_at))
    assert not [n for n in os.listdir(tmp_path / "run") if n.startswith(".tmp-")]
    assert not (tmp_path / "out").exists()  # nothing written beside the run
