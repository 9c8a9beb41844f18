"""How long a remote storage may stay silent before a call fails.

A dead endpoint (connections refused), an unreachable one (packets dropped) and a
silent one (connections accepted, never answered) must all end in a one-line
:class:`~ckptkit.errors.StorageError`, not a hang. Two limits, both "no progress"
limits rather than caps on the whole transfer, so that a large file on a slow link
is never cut off while it is moving:

``timeout`` (``CKPTKIT_REMOTE_TIMEOUT``, default 30 s)
    a read-type call (list, stat, read, delete, a small write) fails when it has got
    no answer for this long, retries included. Large reads go in ranges sized to the
    observed speed, and the clock restarts with each range received.
``write_timeout`` (``CKPTKIT_REMOTE_WRITE_TIMEOUT``, default 120 s)
    an upload fails when no part of it has been acknowledged, and the socket has
    taken no byte of it, for this long, retries included (:func:`until_stalled`).
    Parts are sized to the observed speed so that each is acknowledged in a fraction
    of the limit: the kernel's socket buffers take megabytes at once, so bytes taken
    alone do not show that the server is still receiving.

Both can also be given per URL (``gs://b/run?timeout=10&write_timeout=300``) or as
storage options; the URL wins over the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ckptkit.errors import ConfigError

T = TypeVar("T")

TIMEOUT_ENV = "CKPTKIT_REMOTE_TIMEOUT"
WRITE_TIMEOUT_ENV = "CKPTKIT_REMOTE_WRITE_TIMEOUT"
DEFAULT_TIMEOUT = 30.0
DEFAULT_WRITE_TIMEOUT = 120.0
# After a call gave up because the endpoint did not answer, later calls get this much
# (at most) until one succeeds: the cleanup after a failed save (delete the partial
# checkpoint, release the lock) must not wait the full limit once more per call.
PROBE_TIMEOUT = 5.0


def _seconds(value: Any, source: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ConfigError(
            f"{source}={value!r}: not a number of seconds; give a positive number such as 60"
        )
    return seconds


@dataclass(frozen=True)
class Timeouts:
    """The two limits of a remote storage, in seconds (see the module docstring)."""

    timeout: float = DEFAULT_TIMEOUT
    write_timeout: float = DEFAULT_WRITE_TIMEOUT

    def __post_init__(self) -> None:
        _seconds(self.timeout, "timeout")
        _seconds(self.write_timeout, "write_timeout")

    @property
    def connect(self) -> float:
        """Limit for opening one TCP connection (a blackholed SYN is retried in time)."""
        return min(10.0, self.timeout)

    @classmethod
    def take(cls, options: dict[str, Any]) -> Timeouts:
        """The limits from ``options`` (removed from it: they are not the filesystem's),
        else from the environment, else the defaults."""
        values = {}
        for name, env, default in (
            ("timeout", TIMEOUT_ENV, DEFAULT_TIMEOUT),
            ("write_timeout", WRITE_TIMEOUT_ENV, DEFAULT_WRITE_TIMEOUT),
        ):
            if name in options:
                values[name] = _seconds(options.pop(name), name)
            elif os.environ.get(env, "").strip():
                values[name] = _seconds(os.environ[env].strip(), env)
            else:
                values[name] = default
        return cls(**values)

    def env_name(self, write: bool) -> str:
        return WRITE_TIMEOUT_ENV if write else TIMEOUT_ENV


class Clock:
    """A no-progress clock: :meth:`remaining` seconds are left until ``limit`` seconds
    have passed since the start or the last :meth:`progress`."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.started = self._last = time.monotonic()

    def progress(self) -> None:
        self._last = time.monotonic()

    def remaining(self) -> float:
        return self._last + self.limit - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started


class Health:
    """Whether the endpoint answered lately; shared by a storage and its children
    (and their threads, e.g. the lock heartbeat)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.down = False

    def clock(self, limit: float) -> Clock:
        with self._lock:
            return Clock(min(limit, PROBE_TIMEOUT) if self.down else limit)

    def mark(self, up: bool) -> None:
        with self._lock:
            self.down = not up


# How much larger one part may be than the one before: the speed a small part shows is
# mostly latency (an underestimate), so growth is bounded by this rather than by it.
GROWTH = 16


def next_part(done: int, seconds: float, current: int, *, limit: float, lo: int, hi: int) -> int:
    """The size of the next part of a transfer: what the last one's speed moves in a
    quarter of ``limit``, at most ``GROWTH`` times the last part, within ``[lo, hi]``, a
    multiple of ``lo`` (GCS resumable uploads need multiples of 256 KiB)."""
    rate = done / max(seconds, 1e-3)
    size = min(int(rate * limit / 4), GROWTH * current, hi)
    return max(lo, size // lo * lo)


class Pace:
    """The speed the last upload part moved at, shared by a storage and its children:
    the next upload's first part is sized to it (what a quarter of the limit moves)
    instead of ramping up from the smallest part again, file after file."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rate: float | None = None  # bytes per second

    def observe(self, nbytes: int, seconds: float) -> None:
        if nbytes > 0:
            with self._lock:
                self._rate = nbytes / max(seconds, 1e-3)

    def first_part(self, *, limit: float, lo: int, hi: int) -> int:
        """``lo`` until a part was seen; then what that speed moves in ``limit / 4``."""
        with self._lock:
            rate = self._rate
        if rate is None:
            return lo
        return max(lo, min(int(rate * limit / 4), hi) // lo * lo)


async def until_stalled(
    clock: Clock, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any
) -> T:
    """Await ``fn(*args, **kwargs)``, a coroutine that calls ``clock.progress()`` as it
    moves (a streamed upload), until it finishes or ``clock`` runs out; then it is
    cancelled and :class:`TimeoutError` raised. A fixed ``asyncio.wait_for`` would cut
    off an upload that takes longer than the limit while it keeps moving."""
    task = asyncio.ensure_future(fn(*args, **kwargs))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=max(0.0, clock.remaining()))
            if done:
                return task.result()
            if clock.remaining() <= 0:
                raise TimeoutError(f"no progress for {clock.limit:g} s")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait({task}, timeout=1.0)


__all__ = ["Clock", "Health", "Pace", "Timeouts", "next_part", "until_stalled"]
