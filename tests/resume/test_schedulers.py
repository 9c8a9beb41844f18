"""In-process resume checks: LR schedules and the AMP scaler continue exactly after a
mid-epoch checkpoint, and ``CheckpointManager.resume`` keeps its promises."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as sch
from torch.utils.data import TensorDataset

from ckptkit import (
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointWarning,
    ConfigError,
    EarlyStopping,
    IncompatibleCheckpointError,
    ResumableDataLoader,
    RNGState,
)

EPOCHS, BATCHES = 3, 10  # 40 samples in batches of 4
TOTAL = EPOCHS * BATCHES

# name -> (when it steps, factory). "plateau" steps per epoch on the validation loss.
SCHEDULES: dict[str, tuple[str, Callable[[torch.optim.Optimizer], Any]]] = {
    "OneCycleLR": ("step", lambda o: sch.OneCycleLR(o, max_lr=0.1, total_steps=TOTAL)),
    "warmup+cosine": (
        "step",
        lambda o: sch.SequentialLR(
            o,
            [sch.LinearLR(o, 0.1, total_iters=5), sch.CosineAnnealingLR(o, T_max=TOTAL - 5)],
            milestones=[5],
        ),
    ),
    "CosineAnnealingWarmRestarts": ("step", lambda o: sch.CosineAnnealingWarmRestarts(o, T_0=7)),
    "StepLR": ("epoch", lambda o: sch.StepLR(o, step_size=1, gamma=0.5)),
    "LambdaLR": ("epoch", lambda o: sch.LambdaLR(o, lambda e: 0.8**e)),
    # A 50 % relative threshold: the loss never improves "enough", so the LR keeps dropping.
    "ReduceLROnPlateau": (
        "plateau",
        lambda o: sch.ReduceLROnPlateau(o, patience=0, factor=0.5, threshold=0.5),
    ),
}


def make_state(schedule: str = "OneCycleLR", width: int = 8) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Dropout(0.1), nn.Linear(width, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(
        torch.randn(4 * BATCHES, 4, generator=g), torch.randn(4 * BATCHES, 1, generator=g)
    )
    return {
        "model": model,
        "optimizer": opt,
        "scheduler": SCHEDULES[schedule][1](opt),
        "loader": ResumableDataLoader(data, batch_size=4, shuffle=True, seed=0),
        "rng": RNGState(),
        "early_stopping": EarlyStopping(patience=3),
        "step": 0,
        "epoch": 0,
    }


def train(state: dict[str, Any], when: str, lrs: list[float], stop_at: int | None = None) -> None:
    """Train to the end, or return right after optimizer step ``stop_at``; append the LR
    in effect after every optimizer step and every epoch end."""
    model, opt, sched, loader = (state[k] for k in ("model", "optimizer", "scheduler", "loader"))
    while state["epoch"] < EPOCHS:
        loader.set_epoch(state["epoch"])
        for x, y in loader:
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if when == "step":
                sched.step()
            state["step"] += 1
            lrs.append(opt.param_groups[0]["lr"])
            if state["step"] == stop_at:
                return
        # Epoch end (a run resumed after the epoch's last batch gets here at once).
        val = nn.functional.mse_loss(model(loader.dataset.tensors[0]), loader.dataset.tensors[1])
        state["early_stopping"].step(val.item(), state["step"])
        if when == "epoch":
            sched.step()
        elif when == "plateau":
            sched.step(val.item())
        state["epoch"] += 1
        lrs.append(opt.param_groups[0]["lr"])


def scramble_global_rngs() -> None:
    """A new process starts from other RNG states; the restore must not depend on them."""
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)


# Resumed right after an epoch's last batch, the epoch-end scheduler step comes before this
# process's first optimizer.step(); torch warns about that order, the LRs are unaffected.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`:UserWarning")
@pytest.mark.parametrize("stop_at", [13, BATCHES], ids=["mid-epoch", "after-last-batch"])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_schedule_continues_exactly_after_resume(
    schedule: str, stop_at: int, tmp_path: Path
) -> None:
    when = SCHEDULES[schedule][0]
    expected_lrs: list[float] = []
    uninterrupted = make_state(schedule)
    train(uninterrupted, when, expected_lrs)
    assert len(set(expected_lrs)) > 2, "the schedule should actually move the LR"

    lrs: list[float] = []
    first = make_state(schedule)
    train(first, when, lrs, stop_at=stop_at)
    with CheckpointManager(str(tmp_path / "run")) as mgr:
        mgr.save(first["step"], first)

    scramble_global_rngs()
    second = make_state(schedule)
    with CheckpointManager(str(tmp_path / "run")) as mgr:
        assert mgr.resume(second, "latest") == stop_at
    train(second, when, lrs)

    assert lrs == expected_lrs
    for name, tensor in uninterrupted["model"].state_dict().items():
        assert torch.equal(tensor, second["model"].state_dict()[name]), name
    assert second["early_stopping"].state_dict() == uninterrupted["early_stopping"].state_dict()


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="torch.amp.GradScaler needed")
def test_grad_scaler_round_trips_and_continues_identically(tmp_path: Path) -> None:
    overflow_at = {3, 8}  # steps whose loss is inf: skipped, the scale backs off

    def fresh() -> dict[str, Any]:
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3)
        return {"model": model, "optimizer": opt, "scaler": scaler, "step": 0}

    def steps(state: dict[str, Any], until: int, scales: list[float]) -> None:
        x = torch.ones(2, 4)
        while state["step"] < until:
            state["step"] += 1
            loss = state["model"](x).sum() * (float("inf") if state["step"] in overflow_at else 1.0)
            state["optimizer"].zero_grad()
            state["scaler"].scale(loss).backward()
            state["scaler"].step(state["optimizer"])
            state["scaler"].update()
            scales.append(state["scaler"].get_scale())

    expected: list[float] = []
    uninterrupted = fresh()
    steps(uninterrupted, 14, expected)
    assert len(set(expected)) > 2, "the scale should both back off and grow"

    scales: list[float] = []
    first = fresh()
    steps(first, 5, scales)
    saved = first["scaler"].state_dict()
    assert saved["_growth_tracker"] > 0, "save mid-way to a growth, so the tracker matters"
    with CheckpointManager(str(tmp_path / "run")) as mgr:
        mgr.save(first["step"], first)

    second = fresh()
    with CheckpointManager(str(tmp_path / "run")) as mgr:
        mgr.resume(second, "latest")
    assert second["scaler"].state_dict() == saved
    steps(second, 14, scales)
    assert scales == expected
    assert torch.equal(second["model"].weight, uninterrupted["model"].weight)


# -- resume() semantics -------------------------------------------------------------------


def trained(schedule: str = "OneCycleLR", steps: int = 7, width: int = 8) -> dict[str, Any]:
    state = make_state(schedule, width)
    train(state, "step", [], stop_at=steps)
    return state


def snapshot(state: dict[str, Any]) -> dict[str, Any]:
    """Copies of everything a restore could change, to prove nothing was loaded."""
    return {
        "model": {k: v.clone() for k, v in state["model"].state_dict().items()},
        "optimizer": repr(state["optimizer"].state_dict()),
        "loader": state["loader"].state_dict(),
        "step": state["step"],
        "epoch": state["epoch"],
    }


def assert_unchanged(state: dict[str, Any], before: dict[str, Any]) -> None:
    after = snapshot(state)
    assert after["model"].keys() == before["model"].keys()
    for k, v in before["model"].items():
        assert torch.equal(v, after["model"][k]), f"model {k} was changed"
    assert after["optimizer"] == before["optimizer"], "the optimizer was changed"
    assert (after["loader"], after["step"], after["epoch"]) == (
        before["loader"],
        before["step"],
        before["epoch"],
    )


def test_resume_latest_on_an_empty_run_is_an_error(tmp_path: Path) -> None:
    state = make_state()
    with (
        CheckpointManager(str(tmp_path / "run")) as mgr,
        pytest.raises(CheckpointNotFoundError, match="resume='auto'"),
    ):
        mgr.resume(state, "latest")


def test_resume_auto_starts_fresh_then_continues(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    state = make_state()
    before = snapshot(state)
    with CheckpointManager(run) as mgr:
        assert not mgr.resume(state, "auto").resumed
        assert_unchanged(state, before)
        train(state, "step", [], stop_at=5)
        mgr.save(5, state)
    again = make_state()
    with CheckpointManager(run) as mgr:
        assert mgr.resume(again, "auto") == 5
    assert again["step"] == 5
    assert torch.equal(again["model"][0].weight, state["model"][0].weight)


def test_resume_never_refuses_a_run_with_checkpoints_unless_overwrite(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    with CheckpointManager(run, keep_last=None) as mgr:
        old = trained(steps=3)
        mgr.save(3, old)
        mgr.save(6, old)
    state = make_state()
    before = snapshot(state)
    with CheckpointManager(run) as mgr:
        with pytest.raises(ConfigError, match="overwrite"):
            mgr.resume(state, "never")
        assert [c.step for c in mgr.list()] == [3, 6], "a refusal must not delete anything"
        assert not mgr.resume(state, "never", overwrite=True).resumed
        assert mgr.list() == [], "overwrite deletes the old checkpoints"
        assert_unchanged(state, before)
        mgr.save(1, state)
        assert mgr.latest() is not None and mgr.latest().step == 1


def test_resume_never_on_an_empty_run_starts_fresh(tmp_path: Path) -> None:
    with CheckpointManager(str(tmp_path / "run")) as mgr:
        assert not mgr.resume(make_state(), "never").resumed


@pytest.mark.parametrize("target", ["checkpoint", "run"])
def test_resume_from_another_runs_checkpoint(target: str, tmp_path: Path) -> None:
    source = trained(steps=7)
    with CheckpointManager(str(tmp_path / "a")) as a:
        info = a.save(7, source)
    assert info is not None
    path = info.url if target == "checkpoint" else str(tmp_path / "a")
    state = make_state()
    with CheckpointManager(str(tmp_path / "b")) as b:
        assert b.resume(state, path) == 7
        assert b.list() == [], "nothing is written to the new run by restoring"
        b.save(8, state)
    assert state["step"] == 7 and state["loader"].state_dict() == source["loader"].state_dict()
    assert torch.equal(state["model"][0].weight, source["model"][0].weight)
    with CheckpointManager(str(tmp_path / "a"), readonly=True) as a:
        assert [c.step for c in a.list()] == [7], "the other run is left alone"


def test_resume_from_a_legacy_state_dict_restores_the_model_and_warns(tmp_path: Path) -> None:
    source = trained(steps=7)
    legacy = tmp_path / "checkpoint.pth"
    torch.save(source["model"].state_dict(), legacy)
    state = make_state()
    optimizer_before = repr(state["optimizer"].state_dict())
    with CheckpointManager(str(tmp_path / "run")) as mgr, pytest.warns(CheckpointWarning) as caught:
        mgr.resume(state, str(legacy))
    for name, tensor in source["model"].state_dict().items():
        assert torch.equal(state["model"].state_dict()[name], tensor), name
    assert repr(state["optimizer"].state_dict()) == optimizer_before
    said = " ".join(str(w.message) for w in caught)
    for missing in ("optimizer", "RNG", "data-loader", "EarlyStopping"):
        assert missing in said, f"no warning about the missing {missing} state: {said}"


def test_a_changed_model_is_refused_and_nothing_is_loaded(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    with CheckpointManager(run) as mgr:
        mgr.save(7, trained(steps=7, width=8))
    wider = make_state(width=16)
    before = snapshot(wider)
    with CheckpointManager(run) as mgr, pytest.raises(IncompatibleCheckpointError, match="shape"):
        mgr.resume(wider, "auto")
    assert_unchanged(wider, before)


def test_a_changed_config_is_refused_naming_the_keys_unless_forced(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    with CheckpointManager(run, config={"lr": 0.05, "batch_size": 4, "seed": 0}) as mgr:
        mgr.save(7, trained(steps=7))
    state = make_state()
    before = snapshot(state)
    changed = {"lr": 0.1, "batch_size": 4, "seed": 1}
    with CheckpointManager(run, config=changed) as mgr:
        with pytest.raises(IncompatibleCheckpointError) as refused:
            mgr.resume(state, "auto")
        assert "lr" in str(refused.value) and "seed" in str(refused.value)
        assert "batch_size" not in str(refused.value), "only the differing keys are named"
        assert_unchanged(state, before)
        assert mgr.resume(state, "auto", force=True) == 7
    assert state["step"] == 7
