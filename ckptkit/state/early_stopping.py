"""Early stopping whose best score survives a resume."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, SupportsFloat

from ckptkit.errors import ConfigError, IncompatibleCheckpointError

_MODES = ("min", "max")


class EarlyStopping:
    """Stop when a monitored value has not improved for `patience` consecutive steps.

    Same rule as Time-LLM's `EarlyStopping`: with mode "min" a value is a new best when
    `value < best - delta` ("max": `value > best + delta`); any other value increments the
    counter, and `should_stop` becomes True once the counter reaches `patience`. A new best
    resets the counter. Unlike Time-LLM's, the best value is part of the state, so a resumed
    run keeps comparing against it. A NaN value never counts as a new best.

    With `tie_improves=True` a value equal to `best - delta` (`best + delta` for "max") is a
    new best too: upstream Time-LLM's rule (its `score < best_score + delta` test counts as
    "no improvement" only a strictly worse score). By default a tie is no progress.
    """

    def __init__(
        self, patience: int = 7, delta: float = 0.0, mode: str = "min", tie_improves: bool = False
    ) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ConfigError(f"EarlyStopping patience must be an int >= 1, got {patience!r}")
        if mode not in _MODES:
            raise ConfigError(f"EarlyStopping mode must be 'min' or 'max', got {mode!r}")
        delta = float(delta)
        if not delta >= 0:
            raise ConfigError(f"EarlyStopping delta must be >= 0 (a margin), got {delta!r}")
        self.patience = patience
        self.delta = delta
        self.mode = mode
        self.tie_improves = bool(tie_improves)
        self._best: float | None = None
        self._best_step: int | None = None
        self._counter = 0
        self._should_stop = False
        self._steps = 0

    @property
    def best(self) -> float | None:
        """The best value seen so far; None before the first (non-NaN) value."""
        return self._best

    @property
    def best_step(self) -> int | None:
        """The step of the best value: as passed to `step()`, else the 0-based call count."""
        return self._best_step

    @property
    def counter(self) -> int:
        """Consecutive steps without improvement."""
        return self._counter

    @property
    def should_stop(self) -> bool:
        return self._should_stop

    def step(self, value: SupportsFloat, step: int | None = None) -> bool:
        """Record `value` (a float, NumPy scalar or one-element tensor); return True when it
        is a new best."""
        value = float(value)
        step = self._steps if step is None else int(step)
        self._steps += 1
        if self._is_improvement(value):
            self._best = value
            self._best_step = step
            self._counter = 0
            return True
        self._counter += 1
        if self._counter >= self.patience:
            self._should_stop = True
        return False

    def _is_improvement(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self._best is None:
            return True
        if self.mode == "min":
            bound = self._best - self.delta
            return value <= bound if self.tie_improves else value < bound
        bound = self._best + self.delta
        return value >= bound if self.tie_improves else value > bound

    def state_dict(self) -> dict[str, Any]:
        return {
            "patience": self.patience,
            "delta": self.delta,
            "mode": self.mode,
            "tie_improves": self.tie_improves,
            "best": self._best,
            "best_step": self._best_step,
            "counter": self._counter,
            "should_stop": self._should_stop,
            "steps": self._steps,
        }

    def check_state_dict(self, state: Any) -> None:
        """Raise IncompatibleCheckpointError unless `load_state_dict(state)` would take
        `state`; changes nothing (ckptkit checks every object before restoring any)."""
        fix = "it was not written by EarlyStopping.state_dict()"
        if not isinstance(state, Mapping):
            raise IncompatibleCheckpointError(
                f"EarlyStopping state is a {type(state).__name__}, not a dict; {fix}"
            )
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise IncompatibleCheckpointError(f"EarlyStopping state lacks {missing}; {fix}")
        if state["mode"] != self.mode:
            raise IncompatibleCheckpointError(
                f"EarlyStopping checkpoint was saved with mode={state['mode']!r} but this one "
                f"has mode={self.mode!r}; construct it with mode={state['mode']!r}"
            )
        for key, ok, want in (
            ("best", state["best"] is None or _real(state["best"]), "None or a number"),
            (
                "best_step",
                state["best_step"] is None or _count(state["best_step"]),
                "None or an int >= 0",
            ),
            ("counter", _count(state["counter"]), "an int >= 0"),
            ("steps", _count(state["steps"]), "an int >= 0"),
            ("should_stop", isinstance(state["should_stop"], bool), "a bool"),
            ("patience", "patience" not in state or _count(state["patience"], 1), "an int >= 1"),
            (
                "delta",
                "delta" not in state or (_real(state["delta"]) and state["delta"] >= 0),
                "a number >= 0",
            ),
        ):
            if not ok:
                raise IncompatibleCheckpointError(
                    f"EarlyStopping state has {key}={state.get(key)!r}, expected {want}; {fix}"
                )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore progress. The saved patience, delta and tie rule are adopted; a different mode
        raises IncompatibleCheckpointError, since the saved best would mean the opposite."""
        self.check_state_dict(state)
        # Legacy files carry no patience/delta/tie rule: then the constructor's values stand.
        self.patience = int(state.get("patience", self.patience))
        self.delta = float(state.get("delta", self.delta))
        self.tie_improves = bool(state.get("tie_improves", self.tie_improves))
        self._best = None if state["best"] is None else float(state["best"])
        self._best_step = state["best_step"]
        self._counter = int(state["counter"])
        self._should_stop = bool(state["should_stop"])
        self._steps = int(state["steps"])


_STATE_KEYS = ("mode", "best", "best_step", "counter", "should_stop", "steps")


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _count(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low
