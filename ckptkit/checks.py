"""Dry-run checks of a checkpoint's state against the objects it would be restored
into: each raises ``IncompatibleCheckpointError`` (one line naming both sides and the
fix) and changes nothing. ``stateful.check_state`` runs them for every target before
``apply_state`` writes anything; see docs/RESUME.md, "All or nothing"."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ckptkit.errors import IncompatibleCheckpointError

SCHEDULERS = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
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
LOAD_ERRORS = (
    IncompatibleCheckpointError,
    RuntimeError,
    KeyError,
    ValueError,
    TypeError,
    IndexError,
    AttributeError,
)


def check_stateful(where: str, target: Any, value: Any, recorded: str | None, force: bool) -> None:
    """Check ``value`` against a stateful ``target``: ours for models, optimizers and LR
    schedulers, then the object's own ``check_state_dict`` (the protocol), else a
    generic check of the kind of value."""
    if isinstance(target, torch.nn.Module):
        _check_module(where, target, value)
    elif isinstance(target, torch.optim.Optimizer):
        _check_class(where, target, recorded, "optimizer", force)
        _check_optimizer(where, target, value)
    elif isinstance(target, SCHEDULERS):
        _check_scheduler(where, target, value, recorded, force)
    own_check = getattr(target, "check_state_dict", None)
    if callable(own_check):
        try:
            own_check(value)
        except LOAD_ERRORS as exc:
            raise IncompatibleCheckpointError(f"{where}: {first_line(exc)}") from exc
    elif not checked_here(target):
        # No protocol: only a sanity check of the kind of value its state is.
        _check_kind(where, target.state_dict(), value)


def checked_here(target: Any) -> bool:
    return isinstance(target, (torch.nn.Module, torch.optim.Optimizer, *SCHEDULERS))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, KeyError) and exc.args:
        text = f"missing {exc.args[0]!r}"
    return text.splitlines()[0] if text else type(exc).__name__


def _kind(value: Any) -> str | None:
    """A coarse kind for the type check of values; None where we do not judge."""
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


def check_plain(where: str, current: Any, value: Any) -> None:
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
    _check_tied(where, module, saved)


def tied_keys(module: torch.nn.Module) -> list[list[str]]:
    """Groups of ``state_dict`` keys that are one tensor in ``module`` (tied weights:
    GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``)."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for key, value in module.state_dict(keep_vars=True).items():
        if isinstance(value, torch.Tensor) and value.numel() and value.device.type != "meta":
            ident = (value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
            groups.setdefault(ident, []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]


def fill_tied(module: torch.nn.Module, saved: Any) -> tuple[Any, list[str]]:
    """``saved`` with the keys that are tied in ``module`` and missing from it filled
    from the key they are tied to (writers such as the HF Trainer drop tied copies),
    and notes saying so. Unchanged when nothing is missing; never mutates ``saved``."""
    if not isinstance(saved, Mapping):
        return saved, []
    filled: dict[str, Any] | None = None
    notes: list[str] = []
    for keys in tied_keys(module):
        present = [k for k in keys if k in saved]
        absent = [k for k in keys if k not in saved]
        if present and absent:
            filled = dict(saved) if filled is None else filled
            for k in absent:
                filled[k] = saved[present[0]]
            notes.append(
                f"{', '.join(absent)} restored from {present[0]} (tied to it in this model; "
                "the checkpoint keeps one copy)"
            )
    return (saved if filled is None else filled), notes


def _check_tied(where: str, module: torch.nn.Module, saved: Mapping[str, Any]) -> None:
    # Loading two different values into one tied tensor keeps only the last: refuse.
    for keys in tied_keys(module):
        values = [(k, saved[k]) for k in keys if isinstance(saved.get(k), torch.Tensor)]
        for k, v in values[1:]:
            first, fv = values[0]
            if v.shape == fv.shape and not _same_memory(v, fv) and not torch.equal(v, fv):
                raise IncompatibleCheckpointError(
                    f"{where}: {k} and {first} differ in the checkpoint but are tied in this "
                    f"{type(module).__name__} (saved from an untied model?); build the model "
                    "with the same weight tying (tie_word_embeddings) it was saved with"
                )


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """One tensor read once and referenced twice (a tied weight is stored once): equal
    without comparing every element (NaNs included, which ``torch.equal`` calls unequal)."""
    return (
        a.device == b.device
        and a.dtype == b.dtype
        and a.data_ptr() == b.data_ptr()
        and a.stride() == b.stride()
    )


def _shape(value: Any) -> Any:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _check_optimizer(where: str, opt: torch.optim.Optimizer, saved: Any) -> None:
    """What ``Optimizer.load_state_dict`` checks, and what it lets through that breaks
    ``step()``: another optimizer's hyperparameters, state tensors of other shapes."""
    inner = getattr(opt, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        opt = inner  # a wrapper (accelerate's AcceleratedOptimizer) loads into the one inside
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
