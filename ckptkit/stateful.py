"""Turning the user's ``state`` dict into plain state and back.

Objects with ``state_dict()``/``load_state_dict()`` are saved through them; plain
values (numbers, strings, tensors, lists/dicts of them) are saved as they are and
written back into the dict on restore.

Restoring validates first, then applies: ``check_state`` dry-runs every target against
what the checkpoint holds and raises ``IncompatibleCheckpointError`` before anything is
written. Models, optimizers and LR schedulers are checked in ``checks``; any stateful may
take part by defining the check protocol (see docs/PLUGINS.md)::

    def check_state_dict(self, state_dict) -> None:
        "Raise IncompatibleCheckpointError if load_state_dict(state_dict) would refuse it
        or load something unusable; change nothing."
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import numpy as np
import torch

from ckptkit.checks import (
    LOAD_ERRORS,
    SCHEDULERS,
    check_plain,
    check_stateful,
    checked_here,
    fill_tied,
    first_line,
)
from ckptkit.errors import ConfigError, CorruptCheckpointError, IncompatibleCheckpointError

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


def state_classes(state: Mapping[str, Any]) -> dict[str, str]:
    """``{key: "module.ClassName"}`` of every stateful object in ``state``: saved with a
    checkpoint so that restore can tell an AdamW's state from an Adam's."""
    return {
        key: f"{type(obj).__module__}.{type(obj).__qualname__}"
        for key, obj in state.items()
        if is_stateful(obj)
    }


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
    if isinstance(target, SCHEDULERS):
        return f"no scheduler state: '{key}' restarts its learning-rate schedule"
    return f"no '{key}' in the checkpoint: it keeps its current value"


def check_state(
    state: Mapping[str, Any],
    saved: Mapping[str, Any],
    source: str = "checkpoint",
    *,
    classes: Mapping[str, Any] | None = None,
    force: bool = False,
) -> None:
    """Raise ``IncompatibleCheckpointError`` if restoring ``saved`` into ``state`` would
    refuse any entry or load something unusable; writes nothing.

    ``classes`` is what ``state_classes`` recorded at save time (None for checkpoints that
    lack it: then only shapes and structure are checked). ``force=True`` skips the class
    checks, never the shape and count checks."""
    saved, _ = with_tied(state, saved)
    # Models first: a changed model also changes its optimizer's shapes, and the model
    # is what the user should hear about.
    for key in sorted(state, key=lambda k: not isinstance(state[k], torch.nn.Module)):
        target = state[key]
        if _has_state(saved, key, target):
            recorded = classes.get(key) if isinstance(classes, Mapping) else None
            where = f"{source}: state['{key}']"
            if not is_stateful(target):
                check_plain(where, target, saved[key])
            else:
                recorded = recorded if isinstance(recorded, str) else None
                check_stateful(where, target, saved[key], recorded, force)


def with_tied(
    state: Mapping[str, Any], saved: Mapping[str, Any]
) -> tuple[Mapping[str, Any], list[str]]:
    """``saved`` with each model's tied keys that the checkpoint dropped filled in
    (``checks.fill_tied``), and notes naming them."""
    out: dict[str, Any] | None = None
    notes: list[str] = []
    for key, target in state.items():
        if isinstance(target, torch.nn.Module) and key in saved:
            value, said = fill_tied(target, saved[key])
            if said:
                out = dict(saved) if out is None else out
                out[key] = value
                notes.extend(f"state['{key}']: {n}" for n in said)
    return (saved if out is None else out), notes


def _has_state(saved: Mapping[str, Any], key: str, target: Any) -> bool:
    # A None entry is how scripts say "no state" (Colab's 'scheduler': None).
    return key in saved and not (saved[key] is None and is_stateful(target))


def apply_state(
    state: MutableMapping[str, Any],
    saved: Mapping[str, Any],
    source: str = "checkpoint",
    *,
    classes: Mapping[str, Any] | None = None,
    force: bool = False,
    still_valid: Callable[[str], str | None] | None = None,
    adopt: Callable[[str, Any, Any], Any] | None = None,
) -> list[str]:
    """Load ``saved`` into ``state`` in place, all or nothing; returns notes on what was
    missing. Everything is checked first (``check_state``), so a refused restore leaves
    every object as it was.

    ``still_valid(key)``, asked right before each object loads, says why what was read
    for it can no longer be used (a mapped file someone wants to change), or None;
    ``adopt(key, target, value)`` then gives what it loads (``Lending.adopt``)."""
    saved, mapped = _fit_models(state, saved)
    saved, tied = with_tied(state, saved)
    check_state(state, saved, source, classes=classes, force=force)
    present = [k for k, target in state.items() if _has_state(saved, k, target)]
    notes = mapped + [_missing_note(k, state[k]) for k in state if k not in present] + tied
    # Only a stateful without check_state_dict can still refuse now: load those first,
    # so such a refusal leaves every checked object (and plain value) as it was.
    order = sorted(present, key=lambda k: not _unchecked(state[k]))
    done: list[str] = []
    for key in order:
        target = state[key]
        if not is_stateful(target):
            state[key] = saved[key]
            continue
        why = still_valid(key) if still_valid is not None else None
        if why is not None:
            also = f" (already restored: {', '.join(done)})" if done else ""
            raise CorruptCheckpointError(f"{source}: cannot load state['{key}']: {why}{also}")
        value = saved[key] if adopt is None else adopt(key, target, saved[key])
        try:
            target.load_state_dict(value)
        except LOAD_ERRORS as exc:
            also = f" (already restored: {', '.join(done)})" if done else ""
            if _unchecked(target):
                also += (
                    f"; a check_state_dict() on {type(target).__name__} would refuse it "
                    "before anything is written"
                )
            raise IncompatibleCheckpointError(
                f"{source}: cannot load state['{key}']: {first_line(exc)}{also}"
            ) from exc
        done.append(key)
    return notes


def _fit_models(
    state: Mapping[str, Any], saved: Mapping[str, Any]
) -> tuple[Mapping[str, Any], list[str]]:
    """``saved`` with each model's weights renamed to fit its target where only a
    wrapper's prefix differs (``formats/prefixes.py``), and a note for each; done before
    the checks, so that they see the names that will be loaded."""
    from ckptkit.formats.prefixes import fit_to_model

    out, notes = dict(saved), []
    for key, target in state.items():
        if isinstance(target, torch.nn.Module) and isinstance(saved.get(key), Mapping):
            fitted, note = fit_to_model(saved[key], target.state_dict().keys())
            if note is not None:
                out[key] = fitted
                notes.append(f"state['{key}']: {note}")
    return out, notes


def _unchecked(target: Any) -> bool:
    return (
        is_stateful(target)
        and not checked_here(target)
        and not callable(getattr(target, "check_state_dict", None))
    )
