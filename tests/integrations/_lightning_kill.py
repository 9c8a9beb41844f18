"""Run a script that SIGKILLs itself the Nth time it reaches a named point, so that a
kill lands exactly there (no polling for brief files):

    python -m tests.integrations._lightning_kill POINT N script.py [args...]

Points: ``commit-files`` (inside ckptkit's commit: the data files written, the manifest
not yet), ``commit-rename`` (the manifest written into the temp dir, the rename that
makes the checkpoint visible not done), ``optimizer-step`` (before the Nth
``optimizer.step()``: in the training, between saves). Same points and shape as
tests/killpoints.py (helper "accel"); to be merged into it.
"""

from __future__ import annotations

import functools
import os
import runpy
import signal
import sys
from typing import Any

POINTS = ("commit-files", "commit-rename", "optimizer-step")


def command(point: str, nth: int, script: str, *args: str) -> list[str]:
    if point not in POINTS:
        raise ValueError(f"unknown kill point {point!r}: use one of {POINTS}")
    return [
        sys.executable,
        "-m",
        "tests.integrations._lightning_kill",
        point,
        str(nth),
        script,
        *args,
    ]


class _Counter:
    def __init__(self, nth: int) -> None:
        self.nth, self.seen = nth, 0

    def hit(self) -> None:
        self.seen += 1
        if self.seen >= self.nth:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def _wrap(cls: type, method: str, when: Any, counter: _Counter) -> None:
    real = cls.__dict__[method]

    @functools.wraps(real)
    def wrapper(self: Any, key: Any, *args: Any, **kwargs: Any) -> Any:
        if when(str(key).rstrip("/").rsplit("/", 1)[-1]):
            counter.hit()
        return real(self, key, *args, **kwargs)

    setattr(cls, method, wrapper)


def install(point: str, nth: int) -> None:
    from ckptkit.storage.fsspec_backend import FsspecStorage
    from ckptkit.storage.local import LocalStorage

    counter = _Counter(nth)
    storages = [LocalStorage, FsspecStorage]
    if point == "commit-files":
        for cls in storages:
            _wrap(cls, "write_bytes", lambda leaf: leaf == "manifest.json", counter)
    elif point == "commit-rename":
        for cls in storages:
            if "rename" in cls.__dict__:
                _wrap(cls, "rename", lambda leaf: leaf.startswith(".tmp-"), counter)
    elif point == "optimizer-step":
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        register_optimizer_step_pre_hook(lambda *a, **k: counter.hit())
    else:
        raise ValueError(f"unknown kill point {point!r}: use one of {POINTS}")


if __name__ == "__main__":
    point, nth, script, *rest = sys.argv[1:]
    install(point, int(nth))
    sys.argv = [script, *rest]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
