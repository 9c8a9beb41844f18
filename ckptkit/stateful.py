"""Turning the user's ``state`` dict into plain state and back.

Objects with ``state_dict()``/``load_state_dict()`` are saved through them; plain
values (numbers, strings, tensors, lists/dicts of them) are saved as they are and
written back into the dict on restore.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import numpy as np
import torch

from ckptkit.errors import ConfigError, IncompatibleCheckpointError

_SCHEDULERS = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
_PLAIN = (type(None), bool, int, float, str, bytes, torch.Tensor, torch.dtype, torch.Size)


def is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None)
    )


def _plain(value: Any, where: str) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, Mapping):
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise ConfigError(
        f"{where} is a {type(value).__name__}: give it state_dict()/load_state_dict(), "
        "or store plain values (numbers, strings, tensors, lists/dicts)"
    )


def collect_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """``{key: obj.state_dict() or plain value}`` for everything in ``state``."""
    out: dict[str, Any] = {}
    for key, obj in state.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"state keys must be non-empty strings, got {key!r}")
        out[key] = obj.state_dict() if is_stateful(obj) else _plain(obj, f"state[{key!r}]")
    return out


def _missing_note(key: str, target: Any) -> str:
    kind = type(target).__name__
    if kind == "RNGState":
        return (
            "no RNG state: random streams (data order, dropout) will differ from the original run"
        )
    if kind == "ResumableDataLoader":
        return "no data-loader position: the epoch restarts from its first batch"
    if kind == "EarlyStopping":
        return "no EarlyStopping state: the best score starts fresh"
    if isinstance(target, torch.optim.Optimizer):
        return f"no optimizer state for '{key}': moments restart from zero"
    if isinstance(target, _SCHEDULERS):
        return f"no scheduler state: '{key}' restarts its learning-rate schedule"
    return f"no '{key}' in the checkpoint: it keeps its current value"


def _check_module(key: str, module: torch.nn.Module, saved: Mapping[str, Any], source: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    shapes = sorted(
        f"{k} {tuple(saved[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(own) & set(saved)
        if isinstance(saved[k], torch.Tensor) and saved[k].shape != own[k].shape
    )
    problems = [
        f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
        if items
    ]
    if problems:
        raise IncompatibleCheckpointError(
            f"{source}: state['{key}'] does not fit this model ({'; '.join(problems)}); "
            "restore into the model it was saved from"
        )


def apply_state(
    state: MutableMapping[str, Any], saved: Mapping[str, Any], source: str = "checkpoint"
) -> list[str]:
    """Load ``saved`` into ``state`` in place; returns notes on what was missing.

    Every module is checked first, so a mismatch leaves ``state`` untouched.
    """
    for key, target in state.items():
        if isinstance(target, torch.nn.Module) and key in saved:
            _check_module(key, target, saved[key], source)
    notes: list[str] = []
    for key, target in list(state.items()):
        if key not in saved or (saved[key] is None and is_stateful(target)):
            # A None entry is how scripts say "no state" (Colab's 'scheduler': None).
            notes.append(_missing_note(key, target))
            continue
        if is_stateful(target):
            try:
                target.load_state_dict(saved[key])
            except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise IncompatibleCheckpointError(
                    f"{source}: cannot load state['{key}']: {first}"
                ) from exc
        else:
            state[key] = saved[key]
    return notes
