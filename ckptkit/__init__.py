"""ckptkit: checkpoints that survive preemption, for any PyTorch loop.

    from ckptkit import CheckpointManager, RNGState
    mgr = CheckpointManager("runs/exp1", keep_last=3, save_every_steps=500)
    state = {"model": model, "optimizer": opt, "rng": RNGState(), "epoch": 0}
    result = mgr.resume(state, "auto")   # result.resumed, .step, .checkpoint
    step = result.step or 0
    ...
    mgr.maybe_save(step, state, metrics={"val_loss": v})

Everything not re-exported here is private and may change.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from ckptkit.errors import (
    CheckpointNotFoundError,
    CkptError,
    ConfigError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    MissingDependencyError,
    RunLockedError,
    StorageError,
    UnsafeCheckpointError,
)
from ckptkit.hooks.spec import hookimpl

# Heavy parts (torch) load on first use, so `ckptkit --help` and plugin discovery stay fast.
_LAZY = {
    "EXIT_RESUMABLE": "ckptkit.manager",
    "CheckpointManager": "ckptkit.manager",
    "ResumeResult": "ckptkit.manager",
    "LoaderPosition": "ckptkit.state",
    "inspect": "ckptkit.reader",
    "load": "ckptkit.reader",
    "read_checkpoint": "ckptkit.reader",
    "CheckpointInfo": "ckptkit.run",
    "CheckpointWarning": "ckptkit.run",
    "EarlyStopping": "ckptkit.state",
    "ResumableDataLoader": "ckptkit.state",
    "RNGState": "ckptkit.state",
    "ShardedState": "ckptkit.state",
    "TrainableOnly": "ckptkit.state",
    "open_storage": "ckptkit.storage.registry",
}

if TYPE_CHECKING:
    from ckptkit.manager import EXIT_RESUMABLE, CheckpointManager, ResumeResult
    from ckptkit.reader import inspect, load, read_checkpoint
    from ckptkit.run import CheckpointInfo, CheckpointWarning
    from ckptkit.state import (
        EarlyStopping,
        LoaderPosition,
        ResumableDataLoader,
        RNGState,
        ShardedState,
        TrainableOnly,
    )
    from ckptkit.storage.registry import open_storage


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "EXIT_RESUMABLE",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointWarning",
    "CkptError",
    "ConfigError",
    "CorruptCheckpointError",
    "EarlyStopping",
    "IncompatibleCheckpointError",
    "LoaderPosition",
    "MissingDependencyError",
    "RNGState",
    "ResumableDataLoader",
    "ResumeResult",
    "RunLockedError",
    "ShardedState",
    "StorageError",
    "TrainableOnly",
    "UnsafeCheckpointError",
    "__version__",
    "hookimpl",
    "inspect",
    "load",
    "open_storage",
    "read_checkpoint",
]
