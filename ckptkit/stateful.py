"""Turning the user's ``state`` dict into plain state and back.

Objects with ``state_dict()``/``load_state_dict()`` are saved through them; plain
values (numbers, strings, tensors, lists/dicts of them) are saved as they are and
written back into the dict on restore.

Restoring validates first, then applies: ``check_state`` dry-runs every target against
what the checkpoint holds and raises ``IncompatibleCheckpointError`` before anything is
written. Models, optimizers and LR schedulers are checked here; any other stateful may
take part by defining the check protocol (see docs/PLUGINS.md)::

    def check_state_dict(self, state_dict) -> None:
        "Raise IncompatibleCheckpointError if load_state_dict(state_dict) would refuse it
        or load something unusable; change nothing."
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, MutableMapping
from typing import Any

import numpy as np
import torch

from ckptkit.errors import ConfigError, IncompatibleCheckpointError

_SCHEDULERS = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
# Optimizers whose per-parameter state tensors all have their parameter's shape (others,
# such as LBFGS, Adafactor or 8-bit optimizers, keep factored or flat state).
_ELEMENTWISE = tuple(
    getattr(torch.optim, name)
    for name in (
        "SGD",
        "Adam",  # AdamW is a subclass
        "AdamW",
        "Adagrad",
        "Adadelta",
        "Adamax",
        "ASGD",
        "NAdam",
        "RAdam",
        "RMSprop",
        "Rprop",
        "SparseAdam",
    )
    if hasattr(torch.optim, name)
)
# What a third-party load_state_dict raises for a state it cannot take.
_LOAD_ERRORS = (
    IncompatibleCheckpointError,
    RuntimeError,
    KeyError,
    ValueError,
    TypeError,
    IndexError,
    AttributeError,
)
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
    if isinstance(target, _SCHEDULERS):
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
    # Models first: a changed model also changes its optimizer's shapes, and the model
    # is what the user should hear about.
    for key in sorted(state, key=lambda k: not isinstance(state[k], torch.nn.Module)):
        target = state[key]
        if _has_state(saved, key, target):
            recorded = classes.get(key) if isinstance(classes, Mapping) else None
            where = f"{source}: state['{key}']"
            _check_entry(
                where, target, saved[key], recorded if isinstance(recorded, str) else None, force
            )


def _has_state(saved: Mapping[str, Any], key: str, target: Any) -> bool:
    # A None entry is how scripts say "no state" (Colab's 'scheduler': None).
    return key in saved and not (saved[key] is None and is_stateful(target))


def _check_entry(where: str, target: Any, value: Any, recorded: str | None, force: bool) -> None:
    if not is_stateful(target):
        _check_plain(where, target, value)
        return
    if isinstance(target, torch.nn.Module):
        _check_module(where, target, value)
    elif isinstance(target, torch.optim.Optimizer):
        _check_class(where, target, recorded, "optimizer", force)
        _check_optimizer(where, target, value)
    elif isinstance(target, _SCHEDULERS):
        _check_scheduler(where, target, value, recorded, force)
    own_check = getattr(target, "check_state_dict", None)
    if callable(own_check):
        try:
            own_check(value)
        except _LOAD_ERRORS as exc:
            raise IncompatibleCheckpointError(f"{where}: {_first_line(exc)}") from exc
    elif not _checked_here(target):
        # No protocol: only a sanity check of the kind of value its state is.
        _check_kind(where, target.state_dict(), value)


def _checked_here(target: Any) -> bool:
    return isinstance(target, (torch.nn.Module, torch.optim.Optimizer, *_SCHEDULERS))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, KeyError) and exc.args:
        text = f"missing {exc.args[0]!r}"
    return text.splitlines()[0] if text else type(exc).__name__


def _kind(value: Any) -> str | None:
    """A coarse kind for the type check of plain values; None where we do not judge."""
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, numbers.Real):
        return "number"
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return "tensor"
    for kind, types in (("str", str), ("bytes", bytes), ("dict", Mapping), ("list", (list, tuple))):
        if isinstance(value, types):
            return kind
    return None


def _check_kind(where: str, current: Any, value: Any) -> None:
    a, b = _kind(current), _kind(value)
    if {a, b} == {"number", "tensor"}:
        # A one-element tensor is how many scripts save a counter (global_step).
        tensor = current if a == "tensor" else value
        if tensor.size == 1 if isinstance(tensor, np.ndarray) else tensor.numel() == 1:
            return
    if a is not None and b is not None and a != b:
        raise IncompatibleCheckpointError(
            f"{where}: checkpoint has {type(value).__name__}, target has "
            f"{type(current).__name__}; restore into a state saved with the same kinds of values"
        )


def _check_plain(where: str, current: Any, value: Any) -> None:
    if current is not None and value is not None:
        _check_kind(where, current, value)


def _check_class(where: str, target: Any, recorded: str | None, what: str, force: bool) -> None:
    # Compared by class name: a class that moved between modules is still the same class.
    if force or recorded is None:
        return
    saved_name, own_name = recorded.rsplit(".", 1)[-1], type(target).__name__
    if saved_name != own_name:
        raise IncompatibleCheckpointError(
            f"{where}: checkpoint has {saved_name}, target is {own_name}; "
            f"build the same {what} or pass force=True"
        )


def _check_module(where: str, module: torch.nn.Module, saved: Any) -> None:
    if not isinstance(saved, Mapping):
        raise IncompatibleCheckpointError(
            f"{where}: checkpoint has a {type(saved).__name__}, not a state dict, for this "
            f"{type(module).__name__}; restore into the model it was saved from"
        )
    own = module.state_dict()
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    shapes = sorted(
        f"{k} {_shape(saved[k])} vs {tuple(own[k].shape)}"
        for k in set(own) & set(saved)
        if isinstance(own[k], torch.Tensor)
        and not (isinstance(saved[k], torch.Tensor) and saved[k].shape == own[k].shape)
    )
    problems = [
        f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
        if items
    ]
    if problems:
        raise IncompatibleCheckpointError(
            f"{where} does not fit this model ({'; '.join(problems)}); "
            "restore into the model it was saved from"
        )


def _shape(value: Any) -> Any:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _check_optimizer(where: str, opt: torch.optim.Optimizer, saved: Any) -> None:
    """What ``Optimizer.load_state_dict`` checks, and what it lets through that breaks
    ``step()``: another optimizer's hyperparameters, state tensors of other shapes."""
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    if (
        not isinstance(groups, list)
        or not isinstance(saved.get("state"), Mapping)
        or not all(isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in groups)
    ):
        raise IncompatibleCheckpointError(
            f"{where}: checkpoint has no optimizer state (state and param_groups) for this "
            f"{type(opt).__name__}; restore into the optimizer it was saved from"
        )
    if opt._optimizer_load_state_dict_pre_hooks:
        return  # a load hook may reshape the state first: then torch's own checks apply
    fix = "build the optimizer over the same parameters, in the same groups and order"
    if len(groups) != len(opt.param_groups):
        raise IncompatibleCheckpointError(
            f"{where}: checkpoint has {len(groups)} param groups, target has "
            f"{len(opt.param_groups)}; {fix}"
        )
    for i, (own, theirs) in enumerate(zip(opt.param_groups, groups, strict=True)):
        if len(own["params"]) != len(theirs["params"]):
            raise IncompatibleCheckpointError(
                f"{where}: param group {i}: checkpoint has {len(theirs['params'])} parameters, "
                f"target has {len(own['params'])}; {fix}"
            )
    lacking = _lacking_hyperparameters(opt, groups)
    if lacking:
        raise IncompatibleCheckpointError(
            f"{where}: the checkpoint's param groups lack {', '.join(lacking)}, which "
            f"{type(opt).__name__} needs (saved from another optimizer?); build the same optimizer"
        )
    if isinstance(opt, _ELEMENTWISE):
        _check_state_shapes(where, opt, saved["state"], groups, fix)


def _lacking_hyperparameters(opt: torch.optim.Optimizer, groups: list[Any]) -> list[str]:
    """Hyperparameters the target's class takes and the saved groups lack even after the
    class fills its defaults in: load_state_dict adopts the saved groups, so step() would
    fail on them (SGD's 'momentum' after loading an AdamW's state)."""
    copies = [{**{k: v for k, v in g.items() if k != "params"}, "params": []} for g in groups]
    probe = type(opt).__new__(type(opt))
    try:
        # The class's own __setstate__ on a throwaway object: what load_state_dict runs.
        probe.__setstate__({"defaults": dict(opt.defaults), "state": {}, "param_groups": copies})
    except Exception:  # noqa: BLE001 - a custom optimizer needing more: its load decides
        return []
    # Only the class's own hyperparameters (its defaults): keys a scheduler added to the
    # target's groups ('initial_lr') are the scheduler's business.
    return sorted({k for got in copies for k in opt.defaults if k not in got})


def _check_state_shapes(
    where: str, opt: torch.optim.Optimizer, state: Mapping[Any, Any], groups: list[Any], fix: str
) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    index = {pid: i for i, pid in enumerate(pid for g in groups for pid in g["params"])}
    for pid, pstate in state.items():
        if pid not in index:
            continue  # torch keeps state of unknown ids aside, untouched
        if not isinstance(pstate, Mapping):
            raise IncompatibleCheckpointError(
                f"{where}: the state of parameter {index[pid]} is a {type(pstate).__name__}, "
                f"not a dict; restore into the optimizer it was saved from"
            )
        param = params[index[pid]]
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise IncompatibleCheckpointError(
                    f"{where}: {name} of parameter {index[pid]} is {tuple(value.shape)} in the "
                    f"checkpoint, the target's parameter is {tuple(param.shape)}; {fix}"
                )


def _check_scheduler(where: str, sched: Any, saved: Any, recorded: str | None, force: bool) -> None:
    if not isinstance(saved, Mapping):
        raise IncompatibleCheckpointError(
            f"{where}: checkpoint has a {type(saved).__name__}, not a scheduler state; "
            f"restore into the scheduler it was saved from"
        )
    if recorded is not None:
        _check_class(where, sched, recorded, "scheduler", force)
        return
    if force:
        return
    # No recorded class (a legacy or older checkpoint): a scheduler's state is its
    # attributes, so public ones it lacks mean another class (StepLR has step_size...).
    lacking = sorted(k for k in sched.state_dict() if not k.startswith("_") and k not in saved)
    if lacking:
        raise IncompatibleCheckpointError(
            f"{where}: the checkpoint's scheduler state lacks {', '.join(lacking[:4])}, which "
            f"{type(sched).__name__} has (saved from another scheduler?); build the same "
            "scheduler or pass force=True"
        )


def apply_state(
    state: MutableMapping[str, Any],
    saved: Mapping[str, Any],
    source: str = "checkpoint",
    *,
    classes: Mapping[str, Any] | None = None,
    force: bool = False,
) -> list[str]:
    """Load ``saved`` into ``state`` in place, all or nothing; returns notes on what was
    missing. Everything is checked first (``check_state``), so a refused restore leaves
    every object as it was."""
    check_state(state, saved, source, classes=classes, force=force)
    present = [k for k, target in state.items() if _has_state(saved, k, target)]
    notes = [_missing_note(k, state[k]) for k in state if k not in present]
    # Only a stateful without check_state_dict can still refuse now: load those first,
    # so such a refusal leaves every checked object (and plain value) as it was.
    order = sorted(present, key=lambda k: not _unchecked(state[k]))
    done: list[str] = []
    for key in order:
        target = state[key]
        if not is_stateful(target):
            state[key] = saved[key]
            continue
        try:
            target.load_state_dict(saved[key])
        except _LOAD_ERRORS as exc:
            also = (
                f" (already restored: {', '.join(done)}; a check_state_dict() on "
                f"{type(target).__name__} would refuse it before anything is written)"
                if done
                else ""
            )
            raise IncompatibleCheckpointError(
                f"{source}: cannot load state['{key}']: {_first_line(exc)}{also}"
            ) from exc
        done.append(key)
    return notes


def _unchecked(target: Any) -> bool:
    return (
        is_stateful(target)
        and not _checked_here(target)
        and not callable(getattr(target, "check_state_dict", None))
    )
