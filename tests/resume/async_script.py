"""A training process with ``async_save=True`` that the async tests run, signal and kill.

    python tests/resume/async_script.py MODE RUN

Modes:

- ``kill``: commits step 1, then starts the async save of step 2, whose writer stops
  inside the checkpoint's temporary directory (after its first file) and prints
  ``WRITER <pid>``; the process prints ``TRAINING`` once ``save()`` returned, and trains
  on until it is SIGKILLed.
- ``exit``: starts the async save of step 1 and returns from ``main`` without closing
  the manager: interpreter exit must finish the save.
- ``exit-fail``: the same, but that commit fails: interpreter exit must say so.
- ``sigterm``: ``handle_signals=True``, a save every 3 steps whose commit takes 1 s;
  prints ``STEP n`` and ``STOP n <exit code>``; SIGTERM makes it save, wait and exit 75.

The commit strategies are the public ``commit=`` API, wrapping the default one.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch

from ckptkit import CheckpointManager, asyncsave
from ckptkit.atomic import RenameCommit
from ckptkit.errors import StorageError


class Holding(RenameCommit):
    """Step 2's commit stops for good right after its first write into the temporary
    directory (the kill lands in the middle of a commit)."""

    def commit(self, storage: Any, target: str, *args: Any, **kwargs: Any) -> None:
        if target.startswith("step-000000000002"):
            storage = _HoldAfterFirstWrite(storage)
        super().commit(storage, target, *args, **kwargs)


class _HoldAfterFirstWrite:
    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr) or name in ("mkdir", "url_of", "child"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            out = attr(*args, **kwargs)
            if args and str(args[0]).startswith(".tmp-"):
                print(f"WRITER {os.getpid()}", flush=True)
                while True:
                    time.sleep(1)
            return out

        return call


class Failing(RenameCommit):
    def commit(self, storage: Any, target: str, *args: Any, **kwargs: Any) -> None:
        raise StorageError(f"{storage.url_of(target)}: injected failure; free space and rerun")


class Slow(RenameCommit):
    def commit(self, storage: Any, target: str, *args: Any, **kwargs: Any) -> None:
        time.sleep(1.0)  # the signal's save is still being written when maybe_save returns
        super().commit(storage, target, *args, **kwargs)


def build() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    return {"model": model, "optimizer": torch.optim.AdamW(model.parameters()), "step": 0}


def step(state: dict[str, Any]) -> None:
    loss = state["model"](torch.randn(8, 64)).pow(2).mean()
    loss.backward()
    state["optimizer"].step()
    state["optimizer"].zero_grad()
    state["step"] += 1


def main(mode: str, run: str) -> int:
    state = build()
    if mode == "kill":
        # The forked writer is what this mode kills: fork this tiny state too (the rule
        # copies a state so small beside the process in a thread: ckptkit/asyncsave.py).
        asyncsave._FORK_MIN_SHARE = 0.0
        mgr = CheckpointManager(run, async_save=True, commit=Holding())
        mgr.resume(state)
        step(state)
        mgr.save(1, state)
        mgr.wait()
        step(state)
        mgr.save(2, state)
        print("TRAINING", flush=True)
        while True:
            step(state)
            time.sleep(0.01)
    if mode in ("exit", "exit-fail"):
        mgr = CheckpointManager(
            run, async_save=True, commit=Failing() if mode == "exit-fail" else None
        )
        step(state)
        mgr.save(1, state)
        print("RETURNED", flush=True)
        return 0  # no close(), no `with`: the interpreter's exit must finish the save
    if mode == "sigterm":
        with CheckpointManager(
            run, async_save=True, handle_signals=True, save_every_steps=3, commit=Slow()
        ) as mgr:
            mgr.resume(state)
            while not mgr.should_stop and state["step"] < 10_000:
                step(state)
                mgr.maybe_save(state["step"], state)
                print(f"STEP {state['step']}", flush=True)
                time.sleep(0.02)
        print(f"STOP {state['step']} {mgr.exit_code}", flush=True)
        return mgr.exit_code
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
