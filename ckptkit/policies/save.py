"""When to save. A trigger answers ``reason(step, now)``: why to save now, or None."""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from ckptkit.errors import ConfigError


class SaveTrigger(Protocol):
    def reason(self, step: int, now: float) -> str | None: ...

    def saved(self, step: int, now: float) -> None:
        """Told after every save, whatever triggered it."""


@dataclass
class EveryNSteps:
    n: int
    _last: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"save_every_steps must be >= 1, got {self.n}")

    def reason(self, step: int, now: float) -> str | None:
        return f"every {self.n} steps" if step % self.n == 0 and step != self._last else None

    def saved(self, step: int, now: float) -> None:
        self._last = step


@dataclass
class EveryTMinutes:
    minutes: float
    _last: float = field(default_factory=time.monotonic, repr=False)

    def __post_init__(self) -> None:
        if self.minutes <= 0:
            raise ConfigError(f"save_every_minutes must be > 0, got {self.minutes}")

    def reason(self, step: int, now: float) -> str | None:
        return f"every {self.minutes:g} min" if now - self._last >= self.minutes * 60 else None

    def saved(self, step: int, now: float) -> None:
        self._last = now


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([dhms])", re.I)
_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str | float | int) -> float:
    """``"1h55m"``, ``"90m"``, ``"45s"``, ``"1:55:00"`` or seconds -> seconds."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        s = text.strip()
        if re.fullmatch(r"\d+(:\d{1,2}){1,2}", s):  # SLURM's H:MM:SS / MM:SS
            parts = [int(p) for p in s.split(":")]
            seconds = float(sum(p * 60**i for i, p in enumerate(reversed(parts))))
        elif _DURATION.sub("", s).strip() == "" and _DURATION.search(s):
            seconds = sum(float(n) * _UNITS[u.lower()] for n, u in _DURATION.findall(s))
        elif re.fullmatch(r"\d+(\.\d+)?", s):
            seconds = float(s)
        else:
            raise ConfigError(
                f"cannot read time limit {text!r}: write it like '1h55m', '90m' or '1:55:00'"
            )
    if seconds <= 0:
        raise ConfigError(f"time limit must be positive, got {text!r}")
    return seconds


@dataclass
class Deadline:
    """Save and stop before ``limit`` seconds after ``start``, leaving room for one more
    step and a save (both measured as the run goes)."""

    limit: float
    start: float = field(default_factory=time.monotonic)
    margin: float = 0.0
    _last_step_at: float | None = field(default=None, repr=False)
    _step_time: float = field(default=0.0, repr=False)
    save_time: float = 0.0

    def reason(self, step: int, now: float) -> str | None:
        if self._last_step_at is not None:
            self._step_time = max(self._step_time * 0.9, now - self._last_step_at)
        self._last_step_at = now
        needed = self._step_time + 2 * self.save_time + self.margin
        return "time limit" if now - self.start + needed >= self.limit else None

    def saved(self, step: int, now: float) -> None:
        pass


class SignalTrigger:
    """Turns SIGTERM / SIGUSR1 / SIGINT into "save at the next step, then stop".

    A second SIGINT falls through to the previous handler (Ctrl+C twice still
    interrupts at once, whatever other signals came between). ``received`` is the first
    signal, the reason to stop. Handlers are only installed from the main thread.
    """

    DEFAULT = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self, signals: Iterable[str] = DEFAULT) -> None:
        self.received: str | None = None
        self._interrupted = False
        self._previous: dict[int, object] = {}
        self._installed = False
        self._names = [s for s in signals if hasattr(signal, s)]

    def install(self) -> None:
        if self._installed or threading.current_thread() is not threading.main_thread():
            return
        for name in self._names:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)
        self._installed = True

    def uninstall(self) -> None:
        if not self._installed:
            return
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._installed = False

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self._interrupted:
            prev = self._previous.get(signum)
            self.uninstall()
            if callable(prev):
                prev(signum, frame)
            raise KeyboardInterrupt
        # A wrapper may pass the stop on as another signal (retry loops send SIGTERM on
        # Ctrl+C): that must neither hide the first Ctrl+C nor replace the first reason.
        self._interrupted = self._interrupted or name == "SIGINT"
        self.received = self.received or name
        self._quiet_worker_deaths()

    def _quiet_worker_deaths(self) -> None:
        # A job-wide signal (SLURM, preemption, Ctrl+C) also kills DataLoader workers, and
        # torch's SIGCHLD handler would then raise inside the save we are about to make.
        # We are stopping anyway; a loader iterated further still reports dead workers.
        # Not undone by uninstall(): the workers may die only after the handlers go.
        sigchld = getattr(signal, "SIGCHLD", None)
        if sigchld is not None:
            signal.signal(sigchld, signal.SIG_DFL)

    def reason(self, step: int, now: float) -> str | None:
        return self.received

    def saved(self, step: int, now: float) -> None:
        pass
