from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from ckptkit.errors import ConfigError, IncompatibleCheckpointError
from ckptkit.state import EarlyStopping


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


class TimeLLMRule:
    """Time-LLM's EarlyStopping decision rule (utils/tools.py), without saving or printing."""

    def __init__(self, patience: int, delta: float) -> None:
        self.patience, self.delta = patience, delta
        self.best_score: float | None = None
        self.counter = 0
        self.early_stop = False

    def __call__(self, val_loss: float) -> None:
        score = -val_loss
        if self.best_score is None:
            self.best_score = score
        elif score < self.best_score + self.delta:
            self.counter += 1
            if self.counter >= self.patience:
                self.early_stop = True
        else:
            self.best_score = score
            self.counter = 0


@pytest.mark.parametrize("delta", [0.0, 0.05])
def test_matches_time_llm_rule(delta: float) -> None:
    rng = random.Random(0)
    ours, theirs = EarlyStopping(patience=4, delta=delta), TimeLLMRule(patience=4, delta=delta)
    for _ in range(200):
        value = rng.uniform(0, 1)
        ours.step(value)
        theirs(value)
        assert (ours.best, ours.counter, ours.should_stop) == (
            -theirs.best_score,  # type: ignore[operator]
            theirs.counter,
            theirs.early_stop,
        )


def test_min_mode_patience() -> None:
    es = EarlyStopping(patience=2)
    assert es.best is None and es.best_step is None and not es.should_stop
    assert es.step(1.0) is True
    assert es.step(0.5) is True
    assert es.step(0.5) is False  # equal is not better
    assert not es.should_stop
    assert es.step(0.7) is False
    assert es.should_stop
    assert (es.best, es.best_step, es.counter) == (0.5, 1, 2)


def test_new_best_resets_counter_but_not_stop_flag() -> None:
    es = EarlyStopping(patience=1)
    es.step(1.0)
    es.step(2.0)
    assert es.should_stop
    assert es.step(0.1) is True
    assert es.counter == 0 and es.should_stop


def test_delta_is_a_margin() -> None:
    es = EarlyStopping(patience=5, delta=0.1)
    es.step(1.0)
    assert es.step(0.95) is False
    assert es.step(0.89) is True


def test_max_mode() -> None:
    es = EarlyStopping(patience=2, delta=0.01, mode="max")
    assert es.step(0.5, step=10) is True
    assert es.step(0.505, step=20) is False
    assert es.step(0.6, step=30) is True
    assert es.step(0.1, step=40) is False
    assert es.step(0.59, step=50) is False
    assert es.should_stop
    assert (es.best, es.best_step) == (0.6, 30)


def test_resume_keeps_best() -> None:
    """Time-LLM's EarlyStopping forgets its best score on resume and takes the next value
    as a new best; ours must not."""
    es = EarlyStopping(patience=3)
    for value in (1.0, 0.4, 0.6):
        es.step(value)
    state = roundtrip(es.state_dict())

    resumed = EarlyStopping(patience=3)
    resumed.load_state_dict(state)

    assert (resumed.best, resumed.best_step, resumed.counter) == (0.4, 1, 1)
    assert resumed.step(0.5) is False
    assert not resumed.should_stop
    assert resumed.step(0.45) is False
    assert resumed.should_stop
    assert resumed.step(0.1) is True
    assert resumed.best_step == 5  # the implicit step count survived the resume too


def test_resume_keeps_stop_flag_and_adopts_saved_settings() -> None:
    es = EarlyStopping(patience=1, delta=0.2)
    es.step(1.0)
    es.step(1.0)
    resumed = EarlyStopping()
    resumed.load_state_dict(roundtrip(es.state_dict()))
    assert resumed.should_stop
    assert (resumed.patience, resumed.delta, resumed.mode) == (1, 0.2, "min")


def test_state_is_plain() -> None:
    es = EarlyStopping()
    es.step(np.float32(0.25))
    state = es.state_dict()
    assert state == roundtrip(state)
    assert all(v is None or type(v) in (int, float, bool, str) for v in state.values())


@pytest.mark.parametrize("value", [np.float64(0.5), np.float32(0.5), torch.tensor(0.5)])
def test_accepts_numpy_and_tensor_scalars(value: object) -> None:
    es = EarlyStopping()
    assert es.step(value) is True  # type: ignore[arg-type]
    assert type(es.best) is float and es.best == 0.5


def test_nan_is_never_best() -> None:
    es = EarlyStopping(patience=2)
    assert es.step(float("nan")) is False
    assert es.best is None
    assert es.step(1.0) is True
    assert es.step(float("nan")) is False
    assert es.counter == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patience": 0}, "patience must be an int >= 1"),
        ({"patience": 2.5}, "patience must be an int >= 1"),
        ({"mode": "avg"}, "mode must be 'min' or 'max'"),
        ({"delta": -0.1}, "delta must be >= 0"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        EarlyStopping(**kwargs)


def test_mode_mismatch_on_load() -> None:
    state = EarlyStopping(mode="max").state_dict()
    with pytest.raises(IncompatibleCheckpointError, match="mode='max'"):
        EarlyStopping(mode="min").load_state_dict(state)
