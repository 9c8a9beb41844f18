"""All-or-nothing restore: every target is checked before anything is written, so a refused
restore leaves every object (weights, optimizer, scheduler, RNGs, statefuls, plain values)
bit for bit as it was, and the error names both sides."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ckptkit import (
    CheckpointManager,
    EarlyStopping,
    IncompatibleCheckpointError,
    ResumableDataLoader,
    RNGState,
)

from .helpers import tensors_equal

pytestmark = pytest.mark.filterwarnings("ignore::ckptkit.CheckpointWarning")


class Versioned:
    """A third-party stateful implementing the check protocol."""

    def __init__(self, version: int = 1, value: int = 0) -> None:
        self.version, self.value = version, value

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.version, "value": self.value}

    def check_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != self.version:
            raise IncompatibleCheckpointError(
                f"Versioned: checkpoint has version {state.get('version')}, "
                f"target is {self.version}; build version {state.get('version')}"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state_dict(state)
        self.value = state["value"]


class Fragile:
    """A third-party stateful without the protocol whose load refuses (after checks pass)."""

    def __init__(self, value: int = 0, refuse: bool = False) -> None:
        self.value, self.refuse = value, refuse

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.refuse:
            raise ValueError("Fragile refuses this state")
        self.value = state["value"]


def _model(width: int = 8, extra: bool = False) -> torch.nn.Module:
    layers = [torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, 2)]
    if extra:
        layers.append(torch.nn.Linear(2, 2))
    return torch.nn.Sequential(*layers)


def _build(
    seed: int,
    *,
    width: int = 8,
    extra: bool = False,
    optimizer: Callable[[Any], torch.optim.Optimizer] | None = None,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    early: EarlyStopping | None = None,
    batch_size: int = 2,
    rng: RNGState | None = None,
) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = _model(width, extra)
    opt = (optimizer or (lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3)))(model)
    sched = (scheduler or (lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 0.1, 100)))(opt)
    loader = ResumableDataLoader(list(range(12)), batch_size=batch_size, seed=seed)
    return {
        "epoch": seed,
        "rng": rng or RNGState(),
        "early": early or EarlyStopping(patience=3),
        "loader": loader,
        "custom": Versioned(1, seed),
        "fragile": Fragile(seed),
        "model": model,
        "optimizer": opt,
        "scheduler": sched,
    }


def _train(state: dict[str, Any], steps: int = 3) -> None:
    gen = torch.Generator().manual_seed(7)
    batches = iter(state["loader"])
    for step in range(steps):
        next(batches)
        state["model"](torch.randn(5, 4, generator=gen)).pow(2).mean().backward()
        state["optimizer"].step()
        state["scheduler"].step()
        state["optimizer"].zero_grad()
        state["early"].step(1.0 / (step + 1), step)


@pytest.fixture
def run(tmp_path: Path) -> str:
    """A run with one checkpoint of a trained state (AdamW, OneCycleLR, everything else)."""
    url = str(tmp_path / "run")
    source = _build(0)
    _train(source)
    source["custom"].value = 41
    with CheckpointManager(url) as mgr:
        mgr.save(3, source)
    return url


def _snapshot(state: dict[str, Any]) -> dict[str, Any]:
    """Deep copies of everything a restore could touch, including the global RNGs."""
    out: dict[str, Any] = {"__keys__": list(state)}
    for key, obj in state.items():
        if isinstance(obj, torch.nn.Module):
            out[key] = {
                "state": {k: v.detach().clone() for k, v in obj.state_dict().items()},
                "params": [p.detach().clone() for p in obj.parameters()],
                "ids": [id(p) for p in obj.parameters()],
            }
        elif isinstance(obj, torch.optim.Optimizer):
            out[key] = {
                "state": copy.deepcopy(obj.state_dict()),
                "groups": [{k: v for k, v in g.items() if k != "params"} for g in obj.param_groups],
                "ids": [[id(p) for p in g["params"]] for g in obj.param_groups],
            }
        elif hasattr(obj, "state_dict"):
            out[key] = copy.deepcopy(obj.state_dict())
        else:
            out[key] = copy.deepcopy(obj)
    out["__random__"] = random.getstate()
    out["__numpy__"] = [
        torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v
        for v in np.random.get_state()
    ]
    out["__torch__"] = torch.get_rng_state()
    return out


def _assert_unchanged(state: dict[str, Any], before: dict[str, Any]) -> None:
    after = _snapshot(state)
    for key in before:
        assert tensors_equal(after[key], before[key]), f"{key} changed by a refused restore"


def _refused(run: str, state: dict[str, Any], match: str, **kwargs: Any) -> str:
    before = _snapshot(state)
    with CheckpointManager(run) as mgr, pytest.raises(IncompatibleCheckpointError) as err:
        mgr.restore(state, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    assert match in message, message
    _assert_unchanged(state, before)
    return message


def _last(state: dict[str, Any], key: str) -> dict[str, Any]:
    """The same state with ``key`` moved to the end: a restore that applies in order and
    checks as it goes has overwritten everything else by the time it gets there."""
    state[key] = state.pop(key)
    return state


def _sgd(m: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)


def _two_groups(m: torch.nn.Module) -> torch.optim.Optimizer:
    params = list(m.parameters())
    return torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:], "lr": 1e-4}])


def _missing_one(m: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(list(m.parameters())[:-1], lr=1e-3)


def _reversed(m: torch.nn.Module) -> torch.optim.Optimizer:
    # Same count per group, but exp_avg of "0.weight" (8, 4) lands on "2.bias" (2,).
    return torch.optim.AdamW(list(m.parameters())[::-1], lr=1e-3)


def _step_lr(o: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.StepLR(o, step_size=10)


def _bad_rng_generators() -> RNGState:
    return RNGState([torch.Generator().manual_seed(5)])


CASES = [
    pytest.param(lambda: _last(_build(1, width=16), "model"), "shape", id="model-shape"),
    pytest.param(lambda: _last(_build(1, extra=True), "model"), "missing", id="model-missing-key"),
    pytest.param(
        lambda: _last(_build(1, optimizer=_sgd), "optimizer"),
        "checkpoint has AdamW, target is SGD",
        id="optimizer-class",
    ),
    pytest.param(
        lambda: _last(_build(1, optimizer=_two_groups), "optimizer"),
        "param groups",
        id="optimizer-group-count",
    ),
    pytest.param(
        lambda: _last(_build(1, optimizer=_missing_one), "optimizer"),
        "group 0",
        id="optimizer-group-size",
    ),
    pytest.param(
        lambda: _last(_build(1, optimizer=_reversed), "optimizer"),
        "exp_avg",
        id="optimizer-state-shape",
    ),
    pytest.param(
        lambda: _last(_build(1, scheduler=_step_lr), "scheduler"),
        "checkpoint has OneCycleLR, target is StepLR",
        id="scheduler-class",
    ),
    pytest.param(
        lambda: _last({**_build(1), "custom": Versioned(2)}, "custom"),
        "version",
        id="custom-check-refuses",
    ),
    pytest.param(
        lambda: _last(_build(1, early=EarlyStopping(mode="max")), "early"),
        "mode",
        id="early-stopping-mode",
    ),
    pytest.param(
        lambda: _last(_build(1, rng=_bad_rng_generators()), "rng"),
        "generators",
        id="rng-generators",
    ),
    pytest.param(
        lambda: _last(_build(1, batch_size=3), "loader"),
        "batch_size",
        id="loader-batch-size",
    ),
]


@pytest.mark.parametrize(("make", "match"), CASES)
def test_a_refused_restore_leaves_every_object_as_it_was(run: str, make: Any, match: str) -> None:
    state = make()
    _refused(run, state, match)
    # The state is still usable, and the right targets still restore.
    with CheckpointManager(run) as mgr:
        assert mgr.restore(_build(2)) == 3


def _rewrite(run: str, key: str, value: Any) -> None:
    """Replace one entry of the checkpoint by saving a state that holds ``value`` there."""
    source = _build(0)
    _train(source)
    source[key] = value
    with CheckpointManager(run) as mgr:
        mgr.save(4, source)


class _Plain:
    """A stand-in whose state_dict is whatever it was given (wrong structure on purpose)."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        self.state = state


def _rng_wrong_torch() -> dict[str, Any]:
    good = RNGState().state_dict()
    return {**good, "torch": torch.zeros(7, dtype=torch.uint8)}  # python/numpy parts are fine


@pytest.mark.parametrize(
    ("key", "saved", "match"),
    [
        pytest.param("early", {"best": 0.5}, "early", id="early-stopping-missing-fields"),
        pytest.param(
            "early",
            {**EarlyStopping().state_dict(), "counter": "three"},
            "counter",
            id="early-stopping-bad-type",
        ),
        pytest.param("rng", {"python": {}}, "rng", id="rng-missing-parts"),
        pytest.param("rng", _rng_wrong_torch(), "torch", id="rng-wrong-torch-state"),
        pytest.param("loader", {"epoch": 1}, "loader", id="loader-missing-fields"),
        pytest.param("model", "not weights", "model", id="model-not-a-state-dict"),
        pytest.param("optimizer", {"state": {}}, "optimizer", id="optimizer-no-groups"),
        pytest.param("epoch", {"n": 3}, "epoch", id="plain-value-type"),
    ],
)
def test_wrong_structure_is_refused_before_anything_is_written(
    run: str, key: str, saved: Any, match: str
) -> None:
    _rewrite(run, key, _Plain(saved) if key != "epoch" else saved)
    _refused(run, _last(_build(1), key), match)


def test_a_stateful_without_the_protocol_is_loaded_before_the_rest(run: str) -> None:
    state = _last({**_build(1), "fragile": Fragile(1, refuse=True)}, "fragile")
    message = _refused(run, state, "Fragile refuses")
    assert "'fragile'" in message


def test_adamw_into_sgd_is_refused_even_with_force(run: str) -> None:
    state = _last(_build(1, optimizer=_sgd), "optimizer")
    message = _refused(run, state, "AdamW")
    assert "SGD" in message and "force=True" in message
    # force=True skips the class check, but AdamW's groups lack SGD's momentum: still refused.
    message = _refused(run, state, "momentum", force=True)
    state["model"](torch.randn(3, 4)).sum().backward()
    state["optimizer"].step()  # the SGD is intact and works


def test_force_lets_a_class_mismatch_through_only_when_shapes_fit(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    source = _build(0, optimizer=lambda m: torch.optim.Adam(m.parameters(), lr=1e-3))
    _train(source)
    with CheckpointManager(run) as mgr:
        mgr.save(3, source)
    # Adam and AdamW have the same state layout: only the recorded class tells them apart.
    target = _build(1)
    _refused(run, target, "checkpoint has Adam, target is AdamW")
    with CheckpointManager(run) as mgr:
        assert mgr.restore(target, force=True) == 3
    assert tensors_equal(
        target["optimizer"].state_dict()["state"], source["optimizer"].state_dict()["state"]
    )
    # Class forced, shapes still checked.
    wrong = _last(_build(1, optimizer=_two_groups), "optimizer")
    _refused(run, wrong, "param groups", force=True)
    wrong = _last(_build(1, width=16), "model")
    _refused(run, wrong, "shape", force=True)
    # A scheduler of another class goes through with force (no shapes to check).
    other = _build(1, optimizer=lambda m: torch.optim.Adam(m.parameters()), scheduler=_step_lr)
    _refused(run, other, "checkpoint has OneCycleLR, target is StepLR")
    with CheckpointManager(run) as mgr:
        assert mgr.restore(other, force=True) == 3


def test_legacy_dict_adamw_into_sgd_is_refused(tmp_path: Path) -> None:
    source = _build(0)
    _train(source)
    path = tmp_path / "legacy.pt"
    torch.save(
        {
            "model": source["model"].state_dict(),
            "optimizer": source["optimizer"].state_dict(),
            "epoch": 2,
        },
        path,
    )
    target = {"epoch": 0, "model": _model(), "optimizer": None}
    target["optimizer"] = _sgd(target["model"])
    target = _last(target, "optimizer")
    before = _snapshot(target)
    with CheckpointManager(str(tmp_path / "other")) as mgr:
        with pytest.raises(IncompatibleCheckpointError, match="momentum"):
            mgr.restore(target, str(path))
        _assert_unchanged(target, before)
        target["optimizer"] = torch.optim.AdamW(target["model"].parameters())
        assert mgr.restore(target, str(path)).step is None  # no step in the file: fresh counters
    assert target["epoch"] == 2


def _roundtrip(tmp_path: Path, make: Callable[[int], dict[str, Any]], steps: int = 2) -> None:
    """Save ``make(0)`` after training, restore into ``make(1)``: no refusal, same state."""
    run = str(tmp_path / "rt")
    source = make(0)

    def loss() -> torch.Tensor:
        return source["model"](torch.randn(5, 4)).pow(2).mean()

    for _ in range(steps):
        loss().backward()
        source["optimizer"].step(loss)  # LBFGS needs the closure; the others take it too
        source["optimizer"].zero_grad()
    with CheckpointManager(run) as mgr:
        mgr.save(1, source)
    target = make(1)
    with CheckpointManager(run) as mgr:
        assert mgr.restore(target) == 1
    assert tensors_equal(target["model"].state_dict(), source["model"].state_dict())
    assert tensors_equal(
        target["optimizer"].state_dict()["state"], source["optimizer"].state_dict()["state"]
    )


class _WithExtra(torch.nn.Linear):
    def get_extra_state(self) -> dict[str, int]:
        return {"calls": 3}

    def set_extra_state(self, state: Any) -> None:
        self.calls = state["calls"]


def _lbfgs(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    return {"model": model, "optimizer": torch.optim.LBFGS(model.parameters(), max_iter=2)}


def _groups_and_scaler(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = _model()
    return {
        "model": model,
        "optimizer": _two_groups(model),
        "scaler": torch.amp.GradScaler("cpu", init_scale=2.0**seed),
    }


def _extra_state(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(_WithExtra(4, 2))
    return {"model": model, "optimizer": torch.optim.RMSprop(model.parameters(), momentum=0.9)}


@pytest.mark.parametrize("make", [_lbfgs, _groups_and_scaler, _extra_state])
def test_matching_targets_are_never_refused(tmp_path: Path, make: Any) -> None:
    _roundtrip(tmp_path, make)


def test_a_scheduler_added_on_resume_is_not_a_mismatch(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    source = _build(0)
    del source["scheduler"]
    with CheckpointManager(run) as mgr:
        mgr.save(1, source)
    target = _build(1, scheduler=_step_lr)  # StepLR adds 'initial_lr' to the groups
    with CheckpointManager(run) as mgr, pytest.warns(Warning, match="no scheduler state"):
        assert mgr.restore(target) == 1


def test_legacy_adam_into_rmsprop_is_refused(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    path = tmp_path / "ck.pt"
    torch.save(
        {"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict()}, path
    )
    target = {"model": _model(), "optimizer": None}
    target["optimizer"] = torch.optim.RMSprop(target["model"].parameters())
    target = _last(target, "optimizer")
    before = _snapshot(target)
    refused = pytest.raises(IncompatibleCheckpointError, match="alpha.*RMSprop")
    with CheckpointManager(str(tmp_path / "run")) as mgr, refused:
        mgr.restore(target, str(path))
    _assert_unchanged(target, before)


class _CheckRaisesValueError(Versioned):
    def check_state_dict(self, state: dict[str, Any]) -> None:
        raise ValueError("unsupported layout v0")


def test_a_check_that_raises_another_error_is_an_incompatible_checkpoint(run: str) -> None:
    state = _last({**_build(1), "custom": _CheckRaisesValueError()}, "custom")
    message = _refused(run, state, "unsupported layout v0")
    assert "state['custom']" in message


def test_only_unprotocolled_objects_can_be_half_restored_and_the_error_says_which(
    run: str,
) -> None:
    state = _build(1)
    state["first"] = Fragile(5)
    state["fragile"] = Fragile(1, refuse=True)
    state = _last(state, "fragile")
    with CheckpointManager(run) as mgr:
        mgr.save(9, {**_build(0), "first": Fragile(7)})
    checked = {k: v for k, v in state.items() if k not in ("first", "fragile")}
    before = _snapshot(checked)
    with CheckpointManager(run) as mgr, pytest.raises(IncompatibleCheckpointError) as err:
        mgr.restore(state)
    assert "already restored: first" in str(err.value) and "check_state_dict" in str(err.value)
    _assert_unchanged(checked, before)


def test_a_checkpoint_without_recorded_classes_gets_the_shape_checks_only(tmp_path: Path) -> None:
    import json

    run = str(tmp_path / "run")
    source = _build(0, optimizer=lambda m: torch.optim.Adam(m.parameters(), lr=1e-3))
    _train(source)
    with CheckpointManager(run) as mgr:
        info = mgr.save(3, source)
    manifest = Path(info.url) / "manifest.json"
    raw = json.loads(manifest.read_text())
    assert raw["metadata"]["state_classes"]["optimizer"] == "torch.optim.adam.Adam"
    assert raw["metadata"]["state_classes"]["scheduler"].endswith(".OneCycleLR")
    del raw["metadata"]["state_classes"]  # as a checkpoint from before the record existed
    manifest.write_text(json.dumps(raw))
    # Adam -> AdamW: same layout, and no record to tell them apart.
    with CheckpointManager(run) as mgr:
        assert mgr.restore(_build(1)) == 3
    # AdamW's groups still lack SGD's momentum; OneCycleLR's state lacks StepLR's step_size.
    _refused(run, _last(_build(1, optimizer=_sgd), "optimizer"), "momentum", force=True)
    _refused(run, _last(_build(1, scheduler=_step_lr), "scheduler"), "step_size")
    with CheckpointManager(run) as mgr:
        assert mgr.restore(_build(1, scheduler=_step_lr), force=True) == 3
