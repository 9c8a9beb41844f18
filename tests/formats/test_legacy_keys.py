"""Nothing lost in reading: ``ckptkit.load()`` of a legacy dict checkpoint returns every key
the file held, under its own name, and ``restore`` still maps the well-known ones."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckptkit
from ckptkit import CheckpointManager, EarlyStopping

from ..core.helpers import tensors_equal

pytestmark = pytest.mark.filterwarnings("ignore::ckptkit.CheckpointWarning")


def _trained() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=100)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).sum().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def _fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=100)
    return model, opt, sched


def _same(value: Any, expected: Any) -> bool:
    """Equal as the file meant it: numpy scalars compare by value, tensors bit for bit."""
    if isinstance(expected, np.generic):
        expected = expected.item()
    if isinstance(expected, float) and math.isinf(expected):
        return value == expected
    return tensors_equal(value, expected)


def _assert_every_key_kept(loaded: dict[str, Any], saved: dict[str, Any]) -> None:
    assert set(loaded) == set(saved), f"keys changed: {sorted(loaded)} != {sorted(saved)}"
    for key, value in saved.items():
        assert _same(loaded[key], value), key


def _colab(model, opt, sched, *, scheduler: bool = True) -> dict[str, Any]:
    # What the Colab Time-LLM scripts save (np.average gives numpy float64).
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict() if scheduler else None,
        "epoch": 2,
        "global_step": 300,
        "best_score": np.float64(-0.125),
        "val_loss_min": np.float64(0.125),
    }


def _write(path: Path, obj: Any) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize("layout", ["file", "step-dir"])
def test_colab_dict_keeps_every_key(tmp_path: Path, layout: str) -> None:
    saved = _colab(*_trained())
    where = "checkpoint.pt" if layout == "file" else "checkpoint_step_300/checkpoint.pt"
    path = _write(tmp_path / where, saved)
    url = path if layout == "file" else str(tmp_path)
    _assert_every_key_kept(ckptkit.load(url), saved)


def test_colab_dict_before_first_validation_keeps_every_key(tmp_path: Path) -> None:
    saved = _colab(*_trained(), scheduler=False)
    saved.update(best_score=None, val_loss_min=float("inf"))
    _assert_every_key_kept(ckptkit.load(_write(tmp_path / "checkpoint", saved)), saved)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda m, o, s: {"model": m.state_dict(), "optimizer": o.state_dict(), "epoch": 5},
            id="plain",
        ),
        pytest.param(
            lambda m, o, s: {
                "model_state_dict": m.state_dict(),
                "optimizer_state_dict": o.state_dict(),
                "iteration": 12,
                "loss": 0.5,
                "config": {"lr": 1e-3, "name": "x"},
            },
            id="generic-names",
        ),
        pytest.param(
            lambda m, o, s: {
                "state_dict": m.state_dict(),
                "optimizer_states": [o.state_dict()],
                "lr_schedulers": [s.state_dict()],
                "epoch": 1,
                "global_step": 9,
            },
            id="lightning",
        ),
        pytest.param(
            # Names that collide with what restore maps them to: neither may be lost.
            lambda m, o, s: {
                "model": "resnet-tiny",
                "model_state_dict": m.state_dict(),
                "step": "warmup",
                "global_step": 9,
                "early_stopping": {"note": "user's own"},
                "val_loss_min": 0.25,
            },
            id="colliding-names",
        ),
    ],
)
def test_dict_checkpoints_keep_every_key(tmp_path: Path, make: Any) -> None:
    saved = make(*_trained())
    _assert_every_key_kept(ckptkit.load(_write(tmp_path / "ck.pth", saved)), saved)


def test_restore_from_colab_dict_still_maps_the_known_names(tmp_path: Path) -> None:
    model, opt, sched = _trained()
    path = _write(tmp_path / "checkpoint_step_300" / "checkpoint.pt", _colab(model, opt, sched))
    fresh_model, fresh_opt, fresh_sched = _fresh()
    state: dict[str, Any] = {
        "model": fresh_model,
        "optimizer": fresh_opt,
        "scheduler": fresh_sched,
        "early_stopping": EarlyStopping(patience=3),
        "epoch": 0,
        "step": 0,
    }
    with CheckpointManager(str(tmp_path / "run")) as mgr:
        assert mgr.restore(state, path) == 300
    assert tensors_equal(fresh_model.state_dict(), model.state_dict())
    assert tensors_equal(fresh_opt.state_dict(), opt.state_dict())
    assert fresh_sched.last_epoch == sched.last_epoch
    assert state["epoch"] == 2 and state["step"] == 300
    assert state["early_stopping"].best == 0.125


def test_restore_writes_the_files_own_names_back(tmp_path: Path) -> None:
    path = _write(tmp_path / "checkpoint.pt", _colab(*_trained()))
    state: dict[str, Any] = {"model": _fresh()[0], "best_score": None, "val_loss_min": None}
    state["global_step"] = 0
    with CheckpointManager(str(tmp_path / "run")) as mgr:
        assert mgr.restore(state, path) == 300
    assert state["best_score"] == -0.125 and state["val_loss_min"] == 0.125
    assert state["global_step"] == 300


def test_restore_from_a_dict_with_scheduler_none_keeps_the_scheduler(tmp_path: Path) -> None:
    model, opt, sched = _trained()
    path = _write(tmp_path / "checkpoint.pt", _colab(model, opt, sched, scheduler=False))
    fresh_model, fresh_opt, fresh_sched = _fresh()
    before = fresh_sched.state_dict()
    state = {"model": fresh_model, "optimizer": fresh_opt, "scheduler": fresh_sched}
    run = str(tmp_path / "run")
    with CheckpointManager(run) as mgr, pytest.warns(ckptkit.CheckpointWarning, match="no sched"):
        assert mgr.restore(state, path) == 300
    assert tensors_equal(fresh_sched.state_dict(), before)
    assert tensors_equal(fresh_model.state_dict(), model.state_dict())
