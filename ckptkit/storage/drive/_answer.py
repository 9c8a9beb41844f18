"""A mount that stops answering. When Colab's Drive FUSE daemon hangs (the connection
stalls rather than drops), every system call on the mount blocks in the kernel until it
answers, maybe never, and no signal but SIGKILL ends it. The training loop must get a
one-line error instead, in bounded time, with nothing lost (the staged uploads replay
on the next run).

So the calls this process's own threads make on the mount from where a hang would stop
the run (reads of the run's folder, the mount checks, the run lock) go through
``Answering.call``: run in a helper thread and given up after ``CKPTKIT_DRIVE_TIMEOUT``
seconds (default 60; Drive is slow, a healthy call never takes that long). The helper
stuck in the call is left behind (a daemon thread: it ends with the call or the
process), and while it is stuck every later call fails at once, so a hung mount costs
one thread, not one per call. The upload thread's own work has a no-progress limit of
the same length instead (``Uploader.wait``): a large copy that keeps moving is never
cut off.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

TIMEOUT_ENV = "CKPTKIT_DRIVE_TIMEOUT"
DEFAULT_TIMEOUT = 60.0


class MountHung(OSError):
    """The mount did not answer a call within the limit."""


def limit() -> float:
    """Seconds a call on the mount may go unanswered (``CKPTKIT_DRIVE_TIMEOUT``)."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_TIMEOUT
    except ValueError:
        value = DEFAULT_TIMEOUT
    return value if value > 0 else DEFAULT_TIMEOUT


HUNG = "it has not answered for"  # how every message about a hung mount starts


def hung_message(seconds: float) -> str:
    return f"{HUNG} {seconds:.0f} s: a hung FUSE connection"


class Answering:
    """Calls on one mount, each given up after ``limit()`` seconds unanswered."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stuck: threading.Thread | None = None
        self._stuck_since = 0.0

    def stuck_for(self) -> float | None:
        """Seconds the oldest unanswered call has waited, or None when none is stuck."""
        with self._lock:
            if self._stuck is not None:
                self._stuck.join(0.2)  # a mount that answers again ends it at once
                if not self._stuck.is_alive():
                    self._stuck = None  # it answered after all: the mount is back
            if self._stuck is None:
                return None
            return time.monotonic() - self._stuck_since

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()``, run in a helper thread; raises :class:`MountHung` when it does not
        return within the limit (or while an earlier call is still unanswered)."""
        waited = self.stuck_for()
        if waited is not None:
            raise MountHung(hung_message(waited))
        out: list[T] = []
        failed: list[BaseException] = []
        done = threading.Event()

        def run() -> None:
            try:
                out.append(fn())
            except BaseException as exc:  # noqa: BLE001 - raised by the caller's thread
                failed.append(exc)
            finally:
                done.set()

        started = time.monotonic()
        helper = threading.Thread(target=run, name="ckptkit-drive-call", daemon=True)
        helper.start()
        seconds = limit()
        while not done.wait(min(0.5, seconds)):  # short waits: Ctrl+C still interrupts
            if time.monotonic() - started >= seconds:
                with self._lock:
                    if self._stuck is None:
                        self._stuck, self._stuck_since = helper, started
                raise MountHung(hung_message(time.monotonic() - started))
        if failed:
            raise failed[0]
        return out[0]


_BY_ROOT: dict[str, Answering] = {}
_BY_ROOT_LOCK = threading.Lock()


def answering_for(root: str) -> Answering:
    """The one ``Answering`` of ``root`` in this process: once a call on it is stuck,
    every storage and queue on that root fails fast."""
    with _BY_ROOT_LOCK:
        found = _BY_ROOT.get(root)
        if found is None:
            found = _BY_ROOT[root] = Answering()
        return found
