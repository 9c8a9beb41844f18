"""A test-side fault injector: run a script that SIGKILLs itself at the Nth time it
reaches a named point, so a kill lands exactly there (no polling for brief files).

    python -m tests.killpoints POINT N script.py [args...]

runs ``script.py args...`` as ``__main__`` with the point armed (``python -m`` needs the
repository root on ``PYTHONPATH``; ``command()`` builds the whole line). Points:

- ``commit-files``: inside ckptkit's commit, every data file of the checkpoint written,
  the manifest not yet (the write of ``manifest.json`` into a checkpoint or its temp dir).
- ``commit-rename``: inside ckptkit's commit, the manifest written into the temp dir, the
  rename that makes it visible not done (rename strategy only).
- ``optimizer-step``: before the Nth ``optimizer.step()`` of any torch optimizer: in the
  training between saves.
- ``hf-trainer-state``: inside the HF Trainer's own ``_save_checkpoint``, after the weights
  (``model.safetensors``), optimizer and RNG files, before ``trainer_state.json``.

The soak (bench/soak/worker.py) reports every storage call over a pipe to a parent that
decides; this is the in-process, no-parent version for tests that need one exact instant.
"""

from __future__ import annotations

import functools
import os
import runpy
import signal
import sys
from collections.abc import Callable
from typing import Any

POINTS = ("commit-files", "commit-rename", "optimizer-step", "hf-trainer-state")
_MANIFEST = "manifest.json"
_TMP = ".tmp-"


def command(point: str, nth: int, script: str, *args: str) -> list[str]:
    """The command line that runs ``script args`` with ``point`` armed at its ``nth`` time."""
    if point not in POINTS:
        raise ValueError(f"unknown kill point {point!r}: use one of {POINTS}")
    return [sys.executable, "-m", "tests.killpoints", point, str(nth), script, *args]


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class _Counter:
    def __init__(self, nth: int) -> None:
        self.nth, self.seen = nth, 0

    def hit(self) -> None:
        self.seen += 1
        if self.seen >= self.nth:
            _die()


def _wrap(cls: type, method: str, when: Callable[..., bool], counter: _Counter) -> None:
    real = cls.__dict__[method]

    @functools.wraps(real)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if when(*args, **kwargs):
            counter.hit()
        return real(self, *args, **kwargs)

    setattr(cls, method, wrapper)


def _storages() -> list[type]:
    """Every storage class that writes in these tests' runs (local, memory://, gs://)."""
    from ckptkit.storage.local import LocalStorage

    classes: list[type] = [LocalStorage]
    try:
        from ckptkit.storage.fsspec_backend import FsspecStorage
    except ImportError:  # pragma: no cover - a layout without it
        return classes
    return [*classes, FsspecStorage]


def install(point: str, nth: int) -> None:
    """Arm ``point`` in this process: SIGKILL at its ``nth`` time."""
    counter = _Counter(nth)
    if point == "commit-files":
        for cls in _storages():
            _wrap(cls, "write_bytes", lambda key, *a, **k: _is_manifest(key), counter)
    elif point == "commit-rename":
        for cls in _storages():
            if "rename" in cls.__dict__:
                _wrap(cls, "rename", lambda src, *a, **k: _leaf(src).startswith(_TMP), counter)
    elif point == "optimizer-step":
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        register_optimizer_step_pre_hook(lambda *a, **k: counter.hit())
    elif point == "hf-trainer-state":
        from transformers.trainer_callback import TrainerState

        _wrap(
            TrainerState,
            "save_to_json",
            lambda path, *a, **k: "checkpoint-" in os.path.dirname(str(path)),
            counter,
        )
    else:
        raise ValueError(f"unknown kill point {point!r}: use one of {POINTS}")


def _leaf(key: str) -> str:
    return str(key).rstrip("/").rsplit("/", 1)[-1]


def _is_manifest(key: str) -> bool:
    # A checkpoint's manifest, in its temp dir (rename) or in place (marker strategy).
    return _leaf(key) == _MANIFEST


def main(argv: list[str]) -> None:
    point, nth, script, *args = argv
    install(point, int(nth))
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
