"""The deferred copy of an async save (``async_snapshot="deferred"``, the default): what
the state's optimizers own (their parameters and state) is copied after ``save()``
returns, and their next ``step()`` waits for that copy; everything else is copied
inside ``save()``. Each test holds the deferred copy back (``held``) to open the window
a fast machine would close at once, then checks the committed checkpoint bit for bit
against a sync save of the state as it was when ``save()`` returned.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from ckptkit import CheckpointManager, asyncsave, hookimpl
from ckptkit.errors import ConfigError
from ckptkit.hooks.manager import get_plugin_manager
from tests.core.helpers import (
    ThreadOnlyStorage,
    in_thread,
    make_training,
    tensors_equal,
    train_steps,
)


class ThreadOnly(ThreadOnlyStorage):
    releases_chunks = False  # the whole copy first: a step waits for the writer's copy


class Backend:
    @hookimpl
    def ckptkit_register_storage(self):
        return {"deferred": ThreadOnly}


@pytest.fixture(autouse=True)
def backend() -> None:
    get_plugin_manager().register(Backend(), name="deferred-test-backend")


class Held:
    """Holds every deferred copy back until ``release()``; ``started`` is set once the
    writer reached it."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.go = threading.Event()

    def release(self) -> None:
        self.go.set()


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[Held]:
    gate = Held()
    run = asyncsave._DeferredCopy.run

    def slow_run(self: Any) -> None:
        if self.empty:  # nothing deferred: nothing to hold back
            run(self)
            return
        gate.started.set()
        assert gate.go.wait(60), "the test never released the deferred copy"
        run(self)

    monkeypatch.setattr(asyncsave._DeferredCopy, "run", slow_run)
    yield gate
    gate.release()  # a failing test must not leave a writer parked


def state_with_buffers() -> dict[str, Any]:
    state = make_training(width=16)
    train_steps(state, 2)
    norm = torch.nn.BatchNorm1d(3)  # buffers a forward updates in place
    norm(torch.randn(8, 3))
    state["norm"] = norm
    state["free"] = torch.arange(6.0)  # a tensor no optimizer owns
    return state


def copy_of(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": {k: v.clone() for k, v in state["model"].state_dict().items()},
        "optimizer": state["optimizer"].state_dict()["state"],
    }


def restored(url: str) -> dict[str, Any]:
    fresh = state_with_buffers()
    train_steps(fresh, 5, seed=7)
    with CheckpointManager(url, readonly=True) as reader:
        reader.restore(fresh)
    return fresh


def test_save_returns_before_the_optimizers_tensors_are_copied_and_step_waits(
    tmp_path, held: Held
) -> None:
    state = state_with_buffers()
    with CheckpointManager(str(tmp_path / "sync"), run_name="r") as sync:
        sync.save(3, state)
    expected = restored(str(tmp_path / "sync"))

    url = f"deferred://{tmp_path}/async"
    with CheckpointManager(url, run_name="r", async_save=True) as mgr:
        mgr.save(3, state)  # returns with the copy held back: nothing owned is copied yet
        assert held.started.wait(10)
        stepper, errors = in_thread(lambda: train_steps(state, 3, seed=9))
        stepper.join(0.5)
        assert stepper.is_alive(), "an optimizer step ran before the deferred copy was taken"
        held.release()
        stepper.join(30)
        assert not stepper.is_alive() and not errors
        mgr.wait()
    got = restored(url)
    for key in ("model", "optimizer", "norm"):
        assert tensors_equal(got[key].state_dict(), expected[key].state_dict()), key
    assert torch.equal(got["free"], expected["free"])


def test_what_no_optimizer_owns_is_copied_inside_save(tmp_path, held: Held) -> None:
    state = state_with_buffers()
    before = {
        "norm": {k: v.clone() for k, v in state["norm"].state_dict().items()},
        "free": state["free"].clone(),
    }
    url = f"deferred://{tmp_path}/async"
    with CheckpointManager(url, run_name="r", async_save=True) as mgr:
        mgr.save(1, state)
        assert held.started.wait(10)
        # The loop's next forward updates the buffers; it writes a tensor of its own.
        state["norm"](torch.randn(8, 3) * 5)
        state["free"].mul_(-1)
        held.release()
        mgr.wait()
    got = restored(url)
    assert tensors_equal(got["norm"].state_dict(), before["norm"])
    assert torch.equal(got["free"], before["free"])


def test_a_write_outside_step_before_the_copy_fails_that_save_not_silently(
    tmp_path, held: Held
) -> None:
    state = state_with_buffers()
    url = f"deferred://{tmp_path}/async"
    with CheckpointManager(url, run_name="r", async_save=True) as mgr:
        held.go.set()  # the first save as usual
        mgr.save(1, state)
        mgr.wait()
        held.go.clear()
        held.started.clear()
        mgr.save(2, state)
        assert held.started.wait(10)
        with torch.no_grad():  # a manual update, not through optimizer.step()
            next(state["model"].parameters()).add_(1.0)
        held.release()
        with pytest.raises(ConfigError, match="async_snapshot='eager'"):
            mgr.wait()
        assert [c.step for c in mgr.list()] == [1]  # the torn one was never committed
        mgr.save(3, state)  # the run goes on
        mgr.wait()
        assert [c.step for c in mgr.list()][-1] == 3


def test_eager_copies_everything_inside_save(tmp_path, held: Held) -> None:
    state = state_with_buffers()
    with CheckpointManager(str(tmp_path / "sync"), run_name="r") as sync:
        sync.save(1, state)
    expected = restored(str(tmp_path / "sync"))
    url = f"deferred://{tmp_path}/async"
    with CheckpointManager(url, run_name="r", async_save=True, async_snapshot="eager") as mgr:
        mgr.save(1, state)
        with torch.no_grad():  # allowed: the copy was taken inside save()
            next(state["model"].parameters()).add_(1.0)
        train_steps(state, 2, seed=4)  # never waits: nothing is deferred
        mgr.wait()
    assert not held.started.is_set()
    got = restored(url)
    assert tensors_equal(got["model"].state_dict(), expected["model"].state_dict())
    with pytest.raises(ConfigError, match="async_snapshot must be one of"):
        CheckpointManager(str(tmp_path / "bad"), async_save=True, async_snapshot="lazy")


def test_restore_waits_for_the_copy_of_a_save_in_flight(tmp_path, held: Held) -> None:
    state = state_with_buffers()
    saved = copy_of(state)
    url = f"deferred://{tmp_path}/async"
    with CheckpointManager(str(tmp_path / "other"), run_name="o") as other:
        train_steps(state, 4, seed=3)
        other.save(9, state)  # what the restore below loads, in place
        other_state = copy_of(state)
    # back to the saved values, so the async save below writes ``saved``
    state["model"].load_state_dict(saved["model"])
    for p, st in zip(state["optimizer"].state.values(), saved["optimizer"].values(), strict=False):
        for k, v in st.items():
            p[k].copy_(v)
    with CheckpointManager(url, run_name="r", async_save=True) as mgr:
        mgr.save(1, state)
        assert held.started.wait(10)
        loader, errors = in_thread(lambda: mgr.restore(state, str(tmp_path / "other")))
        loader.join(0.5)
        assert loader.is_alive(), "restore wrote into the state before the copy was taken"
        held.release()
        loader.join(30)
        assert not loader.is_alive() and not errors
        assert tensors_equal(copy_of(state)["model"], other_state["model"])
        mgr.wait()
    got = restored(url)
    assert tensors_equal(copy_of(got)["model"], saved["model"])


def test_a_failed_deferred_copy_never_hangs_the_next_step(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = asyncsave._copy_pieces

    def failing(pieces: Any, total: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise MemoryError("injected: the deferred copy failed")
        real(pieces, total)

    monkeypatch.setattr(asyncsave, "_copy_pieces", failing)
    state = state_with_buffers()
    url = f"deferred://{tmp_path}/async"
    with CheckpointManager(url, run_name="r", async_save=True) as mgr:
        mgr.save(1, state)
        stepper, errors = in_thread(lambda: train_steps(state, 2))
        stepper.join(30)
        assert not stepper.is_alive() and not errors
        with pytest.raises(MemoryError, match="injected"):
            mgr.wait()
        assert mgr.list() == []


class Wrapper:
    """An optimizer wrapper as accelerate's and Lightning's are: not itself the torch
    optimizer whose step runs, holding it as ``optimizer``."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.optimizer = opt

    def step(self) -> None:
        self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(sd)


def test_a_wrapped_optimizers_tensors_are_deferred_and_its_step_waits(tmp_path, held: Held) -> None:
    state = state_with_buffers()
    model, opt = state["model"], state["optimizer"]
    wrapped = {"model": model, "optimizer": Wrapper(opt)}
    before = copy_of(state)
    url = f"deferred://{tmp_path}/async"
    with CheckpointManager(url, run_name="r", async_save=True) as mgr:
        started = time.monotonic()
        mgr.save(1, wrapped)
        assert held.started.wait(10)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        stepper, errors = in_thread(wrapped["optimizer"].step)
        stepper.join(0.5)
        assert stepper.is_alive(), "the wrapped optimizer stepped before the copy"
        held.release()
        stepper.join(30)
        assert not errors and time.monotonic() - started < 60
        mgr.wait()
    fresh = state_with_buffers()
    with CheckpointManager(url, readonly=True) as reader:
        reader.restore({"model": fresh["model"], "optimizer": Wrapper(fresh["optimizer"])})
    assert tensors_equal(copy_of(fresh)["model"], before["model"])


def test_accelerates_optimizer_is_found_through_its_wrapper(tmp_path, held: Held) -> None:
    accelerate = pytest.importorskip("accelerate")
    state = state_with_buffers()
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt = accelerator.prepare(state["model"], state["optimizer"])
    assert not isinstance(opt, torch.optim.AdamW)  # the wrapper, as a loop holds it
    before = copy_of(state)
    url = f"deferred://{tmp_path}/async"
    with CheckpointManager(url, run_name="r", async_save=True) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
        assert held.started.wait(10)
        loss = model(torch.randn(4, 4)).pow(2).mean()
        accelerator.backward(loss)
        stepper, errors = in_thread(opt.step)
        stepper.join(0.5)
        assert stepper.is_alive(), "accelerate's optimizer stepped before the copy"
        held.release()
        stepper.join(30)
        assert not errors
        mgr.wait()
    fresh = state_with_buffers()
    with CheckpointManager(url, readonly=True) as reader:  # AdamW into an AdamW's wrapper
        reader.restore({"model": fresh["model"], "optimizer": fresh["optimizer"]}, force=True)
    assert tensors_equal(copy_of(fresh)["model"], before["model"])


def test_ctrl_c_while_a_step_waits_for_the_copy_interrupts_it_and_the_save_commits(
    tmp_path, held: Held
) -> None:
    import _thread

    state = state_with_buffers()
    before = copy_of(state)
    url = f"deferred://{tmp_path}/async"
    with CheckpointManager(url, run_name="r", async_save=True) as mgr:
        mgr.save(1, state)
        assert held.started.wait(10)
        timer = threading.Timer(0.3, _thread.interrupt_main)
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            train_steps(state, 1)  # waits in the step's pre-hook until interrupted
        held.release()
        mgr.wait()
        assert [c.step for c in mgr.list()] == [1]
    got = restored(url)
    assert tensors_equal(copy_of(got)["model"], before["model"])


def test_a_child_forked_during_the_copy_steps_without_waiting_for_it(tmp_path, held: Held) -> None:
    from tests.oshelpers import in_fork

    state = state_with_buffers()
    url = f"deferred://{tmp_path}/async"
    with CheckpointManager(url, run_name="r", async_save=True) as mgr:
        mgr.save(1, state)
        assert held.started.wait(10)

        def child() -> int:
            signal.alarm(30)  # a step that waits for the parent's copy: killed, not hung
            train_steps(state, 1)  # its own copy of the state: nothing to wait for
            return 0

        assert in_fork(child) == 0
        held.release()
        mgr.wait()
