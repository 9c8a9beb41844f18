"""CheckpointManager: round trips, which=..., rotation, revisions, compatibility, resume()."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from ckptkit import (
    EXIT_RESUMABLE,
    CheckpointManager,
    CheckpointNotFoundError,
    ConfigError,
    IncompatibleCheckpointError,
    RunLockedError,
    hookimpl,
)
from ckptkit.hooks.manager import get_plugin_manager
from ckptkit.manifest import MANIFEST
from ckptkit.policies import Deadline

from .helpers import make_training, tensors_equal, train_steps


def _names(mgr: CheckpointManager) -> list[str]:
    return [c.name for c in mgr.list()]


def _steps(mgr: CheckpointManager) -> list[int]:
    return [c.step for c in mgr.list()]


def _tagged(step: int) -> dict:
    """A state whose content says which save it came from."""
    return {"weights": {"w": torch.full((3,), float(step))}, "tag": step}


# -- round trip ----------------------------------------------------------------


def test_round_trip_is_bit_exact_and_resumes_identically(run_dir):
    src = make_training(seed=0)
    train_steps(src, 5)
    src.update(epoch=3, history=[0.5, 0.25], best={"loss": 0.25, "at": 40}, name="exp")
    with CheckpointManager(run_dir) as mgr:
        mgr.save(40, src, {"loss": 0.25})

    dst = make_training(seed=123)  # different weights, fresh optimizer and schedule
    dst.update(epoch=0, history=[], best=None, name="")
    with CheckpointManager(run_dir) as mgr:
        assert mgr.restore(dst) == 40

    for key in ("model", "optimizer", "scheduler"):
        assert tensors_equal(src[key].state_dict(), dst[key].state_dict()), key
    # Plain values are written back into the caller's dict.
    assert (dst["epoch"], dst["history"], dst["best"], dst["name"]) == (
        3,
        [0.5, 0.25],
        {"loss": 0.25, "at": 40},
        "exp",
    )
    # The restored run continues exactly as the original would have.
    train_steps(src, 3, seed=9)
    train_steps(dst, 3, seed=9)
    assert tensors_equal(src["model"].state_dict(), dst["model"].state_dict())
    assert src["scheduler"].get_last_lr() == dst["scheduler"].get_last_lr()


def test_restore_on_empty_run_returns_none_and_leaves_state(run_dir):
    state = make_training()
    before = {k: v.clone() for k, v in state["model"].state_dict().items()}
    state["epoch"] = 7
    with CheckpointManager(run_dir) as mgr:
        assert not mgr.restore(state).resumed
        assert mgr.latest() is None and mgr.best() is None and mgr.list() == []
    assert state["epoch"] == 7
    assert tensors_equal(before, state["model"].state_dict())


def test_checkpoint_layout_tensor_files_per_entry_and_a_state_tree(run_dir):
    state = make_training()
    state["epoch"] = 1
    with CheckpointManager(run_dir) as mgr:
        info = mgr.save(1, state)
    files = sorted(os.listdir(os.path.join(run_dir, info.name)))
    # The optimizer has no tensors before its first step; the scheduler never has.
    assert files == ["manifest.json", "model.safetensors", "state.json"]
    assert info.manifest.format == "ckptkit/2"
    assert info.manifest.entries == dict.fromkeys(
        ["model", "optimizer", "scheduler", "epoch"], "state.json"
    )
    assert info.epoch == 1  # taken from state["epoch"] when not given


# -- which= --------------------------------------------------------------------


@pytest.fixture
def three_saves(run_dir):
    with CheckpointManager(run_dir, keep_last=None, best_metric="loss") as mgr:
        for step, loss in ((10, 3.0), (20, 1.0), (30, 2.0)):
            mgr.save(step, _tagged(step), {"loss": loss})
    return run_dir


@pytest.mark.parametrize(
    ("which", "step"),
    [("latest", 30), ("best", 20), (10, 10), ("20", 20), ("step-000000000010", 10)],
)
def test_restore_which(three_saves, which, step):
    state = _tagged(0)
    with CheckpointManager(three_saves, best_metric="loss", readonly=True) as mgr:
        assert mgr.restore(state, which) == step
        assert mgr.restored_from is not None and mgr.restored_from.step == step
    assert state["tag"] == step and state["weights"]["w"].tolist() == [float(step)] * 3


def test_restore_by_path_of_a_checkpoint_or_another_run(three_saves, tmp_path):
    state = _tagged(0)
    with CheckpointManager(str(tmp_path / "other")) as mgr:
        assert mgr.restore(state, os.path.join(three_saves, "step-000000000010")) == 10
        assert state["tag"] == 10
        assert mgr.restore(state, three_saves) == 30  # a run: its latest
        assert state["tag"] == 30


def test_restore_unknown_step_names_what_exists(three_saves):
    with (
        CheckpointManager(three_saves, readonly=True) as mgr,
        pytest.raises(CheckpointNotFoundError, match=r"no checkpoint 15 .*10, 20, 30"),
    ):
        mgr.restore(_tagged(0), 15)


def test_best_without_metric_is_an_error(run_dir):
    with CheckpointManager(run_dir) as mgr:
        mgr.save(1, _tagged(1), {"loss": 1.0})
    with (
        CheckpointManager(run_dir, readonly=True) as mgr,
        pytest.raises(CheckpointNotFoundError, match="no best checkpoint"),
    ):
        mgr.restore(_tagged(0), "best")


def test_a_manager_without_metric_ranks_by_the_one_the_run_recorded(three_saves):
    # What `ckptkit ls` marks best is what restore(state, "best") restores.
    state = _tagged(0)
    with CheckpointManager(three_saves, readonly=True) as mgr:
        assert mgr.best().step == 20
        assert mgr.restore(state, "best") == 20 and state["tag"] == 20


# -- rotation ------------------------------------------------------------------


def test_keep_last_and_never_delete_the_best(run_dir):
    with CheckpointManager(run_dir, keep_last=2, keep_best=1, best_metric="loss") as mgr:
        for step, loss in enumerate([5.0, 1.0, 4.0, 3.0, 2.0], start=1):
            mgr.save(step, _tagged(step), {"loss": loss})
        assert _steps(mgr) == [2, 4, 5]
        assert mgr.best().step == 2 and mgr.latest().step == 5
    assert sorted(n for n in os.listdir(run_dir) if n.startswith("step-")) == [
        "step-000000000002",
        "step-000000000004",
        "step-000000000005",
    ]


def test_keep_best_k_max_mode(run_dir):
    with CheckpointManager(run_dir, keep_last=1, keep_best=2, best_metric="acc", mode="max") as mgr:
        for step, acc in enumerate([0.9, 0.5, 0.95, 0.6, 0.7], start=1):
            mgr.save(step, _tagged(step), {"acc": acc})
        assert _steps(mgr) == [1, 3, 5]
        assert mgr.best().step == 3


def test_best_is_kept_even_with_keep_best_disabled(run_dir):
    with CheckpointManager(run_dir, keep_last=1, keep_best=0, best_metric="loss") as mgr:
        for step, loss in enumerate([1.0, 2.0, 3.0], start=1):
            mgr.save(step, _tagged(step), {"loss": loss})
        assert _steps(mgr) == [1, 3]


@pytest.mark.parametrize("how", ["step", "path"])
def test_never_delete_the_checkpoint_the_run_was_restored_from(run_dir, how):
    with CheckpointManager(run_dir, keep_last=None) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, _tagged(step))
    with CheckpointManager(run_dir, keep_last=1, keep_best=0) as mgr:
        which = 1 if how == "step" else os.path.join(run_dir, "step-000000000001")
        assert mgr.restore(_tagged(0), which) == 1
        mgr.save(4, _tagged(4))
        mgr.save(5, _tagged(5))
        assert _steps(mgr) == [1, 5]


class _DeleteRecorder:
    def __init__(self) -> None:
        self.visible_at_delete: list[list[str]] = []

    @hookimpl
    def ckptkit_before_delete(self, manager, info):
        self.visible_at_delete.append([c.name for c in manager.list()])


def test_rotation_deletes_only_after_the_new_checkpoint_is_committed(run_dir, monkeypatch):
    recorder = _DeleteRecorder()
    get_plugin_manager().register(recorder)
    with CheckpointManager(run_dir, keep_last=1, keep_best=0) as mgr:
        mgr.save(1, _tagged(1))
        deleted: list[str] = []
        real_delete = mgr.storage.delete
        monkeypatch.setattr(
            mgr.storage,
            "delete",
            lambda key, recursive=False: (deleted.append(key), real_delete(key, recursive)),
        )
        mgr.save(2, _tagged(2))
    assert recorder.visible_at_delete == [["step-000000000001", "step-000000000002"]]
    # Manifest first, so a kill mid-delete leaves a directory readers ignore.
    assert deleted[:2] == [f"step-000000000001/{MANIFEST}", "step-000000000001"]


def test_resave_at_same_step_keeps_exactly_one_visible(run_dir):
    with CheckpointManager(run_dir) as mgr:
        mgr.save(5, _tagged(1))
        first = mgr.latest()
        mgr.save(5, _tagged(2))
        assert _steps(mgr) == [5]
        assert mgr.latest().name == "step-000000000005-r1" != first.name
        mgr.save(5, _tagged(3))
        assert _names(mgr) == ["step-000000000005-r2"]
        state = _tagged(0)
        assert mgr.restore(state) == 5
        assert state["tag"] == 3


def test_resave_of_the_best_step_keeps_exactly_one_visible(run_dir):
    with CheckpointManager(run_dir, best_metric="loss") as mgr:
        mgr.save(4, _tagged(4), {"loss": 0.5})
        mgr.save(5, _tagged(1), {"loss": 0.1})
        mgr.save(5, _tagged(2), {"loss": 0.1})  # e.g. a signal right after the eval save
        assert _names(mgr) == ["step-000000000004", "step-000000000005-r1"]
        assert mgr.best().name == "step-000000000005-r1"


def test_resave_keeps_the_revision_the_run_was_restored_from(run_dir):
    with CheckpointManager(run_dir) as mgr:
        mgr.save(5, _tagged(1))
    with CheckpointManager(run_dir) as mgr:
        mgr.restore(_tagged(0))
        mgr.save(5, _tagged(2))
        # Protection wins over superseding; the newer revision is the one read.
        assert _names(mgr) == ["step-000000000005", "step-000000000005-r1"]
        state = _tagged(0)
        assert mgr.restore(state) == 5 and state["tag"] == 2


def test_save_beside_a_damaged_checkpoint_of_the_same_step(run_dir):
    with CheckpointManager(run_dir) as mgr:
        mgr.save(5, _tagged(1))
    with open(os.path.join(run_dir, "step-000000000005", MANIFEST), "w") as f:
        f.write("{not json")
    with pytest.warns(UserWarning, match="step-000000000005"), CheckpointManager(run_dir) as mgr:
        info = mgr.save(5, _tagged(2))
        assert info.name == "step-000000000005-r1"
        assert _names(mgr) == ["step-000000000005-r1"]


# -- compatibility -------------------------------------------------------------


def test_config_change_is_refused_listing_keys_unless_forced(run_dir):
    with CheckpointManager(run_dir, config={"lr": 0.1, "batch": 32, "seq": 96}) as mgr:
        mgr.save(1, _tagged(1))
    state = _tagged(0)
    with CheckpointManager(run_dir, config={"lr": 0.2, "batch": 32, "seq": 48}) as mgr:
        with pytest.raises(IncompatibleCheckpointError) as err:
            mgr.restore(state)
        assert "lr: 0.1 -> 0.2" in str(err.value) and "seq: 96 -> 48" in str(err.value)
        assert "batch" not in str(err.value)
        assert state["tag"] == 0
        assert mgr.restore(state, force=True) == 1
        assert state["tag"] == 1


def test_model_shape_change_is_refused_and_state_untouched(run_dir):
    saved = make_training(width=8)
    train_steps(saved, 2)
    with CheckpointManager(run_dir) as mgr:
        mgr.save(1, {**saved, "epoch": 4})

    other = make_training(width=16)
    other["epoch"] = 0
    model_before = {k: v.clone() for k, v in other["model"].state_dict().items()}
    opt_before = other["optimizer"].state_dict()
    with CheckpointManager(run_dir) as mgr, pytest.raises(IncompatibleCheckpointError) as err:
        mgr.restore(other)
    assert "shape" in str(err.value) and "'model'" in str(err.value)
    assert tensors_equal(model_before, other["model"].state_dict())
    assert tensors_equal(opt_before, other["optimizer"].state_dict())
    assert other["epoch"] == 0


# -- resume() ------------------------------------------------------------------


def test_resume_latest_requires_a_checkpoint(run_dir):
    with CheckpointManager(run_dir) as mgr:
        with pytest.raises(CheckpointNotFoundError, match="resume='auto'"):
            mgr.resume(_tagged(0), "latest")
        mgr.save(3, _tagged(3))
        state = _tagged(0)
        assert mgr.resume(state, "latest") == 3 and state["tag"] == 3


def test_resume_auto_starts_fresh_or_continues(run_dir):
    with CheckpointManager(run_dir) as mgr:
        assert not mgr.resume(_tagged(0), "auto").resumed
        mgr.save(3, _tagged(3))
        state = _tagged(0)
        assert mgr.resume(state) == 3 and state["tag"] == 3


def test_resume_never_refuses_existing_checkpoints_unless_overwrite(run_dir):
    with CheckpointManager(run_dir) as mgr:
        assert not mgr.resume(_tagged(0), "never").resumed  # empty run: fine
        mgr.save(3, _tagged(3))
        with pytest.raises(ConfigError, match="overwrite=True"):
            mgr.resume(_tagged(0), "never")
        assert _steps(mgr) == [3]
        state = _tagged(0)
        assert not mgr.resume(state, "never", overwrite=True).resumed
        assert mgr.list() == [] and state["tag"] == 0


def test_resume_from_path(three_saves, tmp_path):
    state = _tagged(0)
    with CheckpointManager(str(tmp_path / "new")) as mgr:
        assert mgr.resume(state, os.path.join(three_saves, "step-000000000020")) == 20
    assert state["tag"] == 20
    with (
        CheckpointManager(str(tmp_path / "new")) as mgr,
        pytest.raises(CheckpointNotFoundError),
    ):
        mgr.resume(state, str(tmp_path / "does-not-exist"))


# -- misc API ------------------------------------------------------------------


def test_plain_value_of_unsupported_type_is_a_config_error(run_dir):
    with CheckpointManager(run_dir) as mgr:
        with pytest.raises(ConfigError, match=r"state\['handle'\]\[1\] is a object"):
            mgr.save(1, {"handle": [1, object()]})
        with pytest.raises(ConfigError, match="set"):
            mgr.save(1, {"ids": {1, 2}})
        assert mgr.list() == []
    assert not [n for n in os.listdir(run_dir) if n.startswith(("step-", ".tmp-"))]


def test_step_must_be_a_non_negative_int(run_dir):
    with CheckpointManager(run_dir) as mgr:
        for bad in (-1, 1.5, True, "3"):
            with pytest.raises(ConfigError, match="step"):
                mgr.save(bad, _tagged(0))


def test_readonly_manager_does_not_lock_and_refuses_writes(run_dir):
    with CheckpointManager(run_dir) as writer:
        writer.save(1, _tagged(1))
        with CheckpointManager(run_dir, readonly=True) as reader:  # no RunLockedError
            assert [c.step for c in reader.list()] == [1]
            with pytest.raises(ConfigError, match="readonly"):
                reader.save(2, _tagged(2))
            with pytest.raises(ConfigError, match="readonly"):
                reader.delete(reader.latest())
        assert _steps(writer) == [1]
        with pytest.raises(RunLockedError):
            CheckpointManager(run_dir)


def test_write_file_and_read_file(run_dir):
    with CheckpointManager(run_dir) as mgr:
        mgr.write_file("metrics.jsonl", '{"loss": 1}\n')
        mgr.write_file("plots/loss.png", b"\x89PNG")
        assert mgr.read_file("metrics.jsonl") == b'{"loss": 1}\n'
        assert mgr.read_file("plots/loss.png") == b"\x89PNG"
        assert mgr.read_file("nope.txt") is None
        mgr.save(1, _tagged(1))
        assert _steps(mgr) == [1]  # run files are not checkpoints
    with CheckpointManager(run_dir, readonly=True) as mgr:
        assert mgr.read_file("metrics.jsonl") == b'{"loss": 1}\n'


def test_run_name_is_stable_across_managers(run_dir):
    with CheckpointManager(run_dir, run_name="exp-a") as mgr:
        assert mgr.run_name == "exp-a"
        info = mgr.save(1, _tagged(1))
    assert info.manifest.metadata["run_name"] == "exp-a"
    with CheckpointManager(run_dir) as mgr:
        assert mgr.run_name == "exp-a"
    with CheckpointManager(run_dir, run_name="other") as mgr:
        assert mgr.run_name == "exp-a"  # the run keeps the name it was created with


def test_default_run_name_comes_from_the_directory(tmp_path):
    url = str(tmp_path / "my-run")
    with CheckpointManager(url) as mgr:
        first = mgr.run_name
    assert first.startswith("my-run-")
    with CheckpointManager(url) as mgr:
        assert mgr.run_name == first


def test_maybe_save_every_n_steps_and_epoch_end(run_dir):
    with CheckpointManager(run_dir, keep_last=None, save_every_steps=3) as mgr:
        saved = [s for s in range(1, 8) if mgr.maybe_save(s, _tagged(s))]
        assert saved == [3, 6]
        assert mgr.maybe_save(7, _tagged(7), epoch_end=True) is not None
        assert not mgr.should_stop and mgr.exit_code == 0
        assert _steps(mgr) == [3, 6, 7]


def test_maybe_save_at_deadline_saves_and_asks_to_stop(run_dir):
    import time

    expired = Deadline(limit=1.0, start=time.monotonic() - 10)
    with CheckpointManager(run_dir, triggers=[expired]) as mgr:
        assert mgr.maybe_save(1, _tagged(1)) is not None
        assert mgr.should_stop and mgr.stop_reason == "time limit"
        assert mgr.exit_code == EXIT_RESUMABLE == 75


def test_signal_saves_at_next_step_then_stops(run_dir):
    previous = signal.getsignal(signal.SIGUSR1)
    with CheckpointManager(run_dir, handle_signals=True) as mgr:
        assert mgr.maybe_save(1, _tagged(1)) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert mgr.maybe_save(2, _tagged(2)) is not None
        assert mgr.should_stop and mgr.stop_reason == "SIGUSR1"
        assert _steps(mgr) == [2]
    assert signal.getsignal(signal.SIGUSR1) is previous  # handlers restored on close


def test_a_run_that_never_saved_leaves_no_files(tmp_path):
    run = tmp_path / "run"
    with CheckpointManager(str(run)) as mgr:
        assert not mgr.restore({"x": 0}).resumed
    assert not run.exists() or sorted(os.listdir(run)) == []
    with CheckpointManager(str(run), run_name="kept") as mgr:
        mgr.save(1, {"x": 1})
    with CheckpointManager(str(run)) as mgr:
        assert mgr.run_name == "kept"
