"""The rolling copy of an async save (``async_snapshot="rolling"``, or a deferred copy
where memory is tight) on a storage that ``releases_chunks`` (local disks):
the writer copies each optimizer-owned storage just before it streams it and frees that
copy once every file entry over it is written; the loop's next optimizer step (or a
restore) copies whatever is left itself, at once, instead of waiting for the disk.

Each test holds the writer after it streamed its first tensor (``mid_file``), so that
part of the state is copied and written and the rest is not, then checks the committed
data files byte for byte against a sync save of the state as it was at ``save()``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptkit import CheckpointManager, asyncsave, hookimpl
from ckptkit.errors import ConfigError
from ckptkit.hooks.manager import get_plugin_manager
from ckptkit.manifest import MANIFEST
from tests.core.helpers import ThreadOnlyStorage, in_thread, make_training, train_steps

RollingThreadOnly = ThreadOnlyStorage  # ``rolling:///dir``: it releases chunks, as disks do


class Backend:
    @hookimpl
    def ckptkit_register_storage(self):
        return {"rolling": RollingThreadOnly}


@pytest.fixture(autouse=True)
def backend() -> None:
    get_plugin_manager().register(Backend(), name="rolling-test-backend")


class MidFile:
    """Holds the writer once it has streamed its first tensor until ``release()``."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.go = threading.Event()
        self.calls = 0

    def release(self) -> None:
        self.go.set()


@pytest.fixture
def mid_file(monkeypatch: pytest.MonkeyPatch) -> Iterator[MidFile]:
    gate = MidFile()
    after = asyncsave._DeferredCopy.after

    def held_after(self: Any, t: torch.Tensor) -> None:
        after(self, t)
        gate.calls += 1
        if gate.calls == 1:
            gate.started.set()
            assert gate.go.wait(60), "the test never released the writer"

    monkeypatch.setattr(asyncsave._DeferredCopy, "after", held_after)
    yield gate
    gate.release()  # a failing test must not leave a writer parked


class Fused(torch.nn.Module):
    """One parameter that other entries of the state view in parts (a fused qkv)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Parameter(torch.randn(12, 4096))  # 192 KiB: whole pages
        self.head = torch.nn.Linear(4096, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x @ self.qkv[:4].t() @ self.qkv[4:8])


def fused_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = Fused()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state: dict[str, Any] = {"model": model, "optimizer": opt}
    step_fused(state, 2)
    w = model.qkv
    # Later entries stream parts of the parameter's storage after the model file is
    # written: its copy may be freed only once they are written too.
    state["views"] = {
        "q": w.detach()[0:4],
        "k": w.detach()[4:8],
        "vt": w.detach()[8:12].t(),  # not contiguous
        "q_again": w.detach()[0:4],  # the same view again: written once
    }
    return state


def step_fused(state: dict[str, Any], n: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(5, 4096, generator=g)
        state["optimizer"].zero_grad()
        state["model"](x).pow(2).mean().backward()
        state["optimizer"].step()


def data_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def committed(root: Path, step: int | None = None) -> Path:
    """The folder of the run's checkpoint at ``step`` (the only one when None)."""
    with CheckpointManager(str(root), run_name="r", readonly=True) as reader:
        found = [c for c in reader.list() if step is None or c.step == step]
    (info,) = found
    return Path(info.url.split("://", 1)[-1])


def sync_files(tmp_path: Path, state: dict[str, Any], step: int) -> dict[str, bytes]:
    with CheckpointManager(str(tmp_path / "sync"), run_name="r") as sync:
        sync.save(step, state)
    return data_files(committed(tmp_path / "sync"))


def trained() -> dict[str, Any]:
    state = make_training(width=16)
    train_steps(state, 2)
    return state


def rolling(tmp_path: Path) -> CheckpointManager:
    return CheckpointManager(
        f"rolling://{tmp_path}/async", run_name="r", async_save=True, async_snapshot="rolling"
    )


def test_a_step_during_a_rolling_save_copies_the_rest_itself_and_never_waits_for_the_disk(
    tmp_path: Path, mid_file: MidFile
) -> None:
    state = trained()
    expected = sync_files(tmp_path, state, 3)
    with rolling(tmp_path) as mgr:
        mgr.save(3, state)
        assert mid_file.started.wait(10)
        stepper, errors = in_thread(lambda: train_steps(state, 3, seed=9))
        stepper.join(30)  # the writer is still held: a step that waited for it hangs
        assert not stepper.is_alive(), "a step waited for the rolling writer"
        assert not errors
        mid_file.release()
        mgr.wait()
    assert data_files(committed(tmp_path / "async")) == expected


def test_views_of_one_storage_in_later_files_are_written_before_its_copy_is_freed(
    tmp_path: Path,
) -> None:
    state = fused_state()
    expected = sync_files(tmp_path, state, 1)
    with rolling(tmp_path) as mgr:
        mgr.save(1, state)
        mgr.wait()
        buffers = mgr._background._buffers
        # The owned storages' copies were freed (their pages read as zeros again); what
        # was copied inside save() is kept for the next one.
        flat, page = buffers._flat, 4096
        assert buffers._region is not None
        pages = flat[: flat.numel() // page * page].view(-1, page)
        kept = int((pages != 0).any(dim=1).sum())
        # All of this state is owned: only the pages shared by two copies' ends are kept.
        assert len(pages) > 100 and kept < len(pages) // 10, (kept, len(pages))
        mgr.save(2, state)  # the kept buffer again, its freed pages faulted back in
        mgr.wait()
    got = data_files(committed(tmp_path / "async", 1))
    assert got == expected
    assert data_files(committed(tmp_path / "async", 2)) == expected


def test_a_change_outside_step_before_its_copy_fails_the_save_but_not_after_it(
    tmp_path: Path, mid_file: MidFile
) -> None:
    state = trained()
    params = list(state["model"].parameters())
    expected = sync_files(tmp_path, state, 2)
    with rolling(tmp_path) as mgr:
        mgr.save(2, state)
        assert mid_file.started.wait(10)
        with torch.no_grad():  # the first tensor is copied and written already: harmless
            params[0].add_(1.0)
        mid_file.release()
        mgr.wait()
        assert data_files(committed(tmp_path / "async")) == expected

        mid_file.go.clear()
        mid_file.started.clear()
        mid_file.calls = 0
        mgr.save(3, state)
        assert mid_file.started.wait(10)
        with torch.no_grad():  # the last parameter is not copied yet: a torn snapshot
            params[-1].add_(1.0)
        mid_file.release()
        with pytest.raises(ConfigError, match="async_snapshot='eager'"):
            mgr.wait()
        assert [c.step for c in mgr.list()] == [2]  # the torn one was never committed


def test_restore_during_a_rolling_save_takes_the_rest_and_does_not_wait(
    tmp_path: Path, mid_file: MidFile
) -> None:
    state = trained()
    expected = sync_files(tmp_path, state, 1)
    other = make_training(width=16)
    train_steps(other, 5, seed=3)
    with CheckpointManager(str(tmp_path / "other"), run_name="o") as saver:
        saver.save(9, other)
    with rolling(tmp_path) as mgr:
        mgr.save(1, state)
        assert mid_file.started.wait(10)
        loader, errors = in_thread(lambda: mgr.restore(state, str(tmp_path / "other")))
        loader.join(30)
        assert not loader.is_alive() and not errors, errors
        for a, b in zip(state["model"].parameters(), other["model"].parameters(), strict=True):
            assert torch.equal(a, b)
        mid_file.release()
        mgr.wait()
    assert data_files(committed(tmp_path / "async")) == expected


def test_a_deferred_copy_rolls_by_itself_where_a_copy_would_not_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = fused_state()
    expected = sync_files(tmp_path, state, 1)

    def saved_pages(url: str) -> int:
        with CheckpointManager(url, run_name="r", async_save=True) as mgr:
            mgr.save(1, state)
            mgr.wait()
            flat = mgr._background._buffers._flat
            pages = flat[: flat.numel() // 4096 * 4096].view(-1, 4096)
            return int((pages != 0).any(dim=1).sum())

    roomy = saved_pages(f"rolling://{tmp_path}/roomy")  # the whole copy, kept
    monkeypatch.setattr(asyncsave, "_available_memory", lambda: 300_000)  # < 2 copies
    tight = saved_pages(f"rolling://{tmp_path}/tight")
    assert tight < roomy // 10, (tight, roomy)
    assert data_files(committed(tmp_path / "tight")) == expected
    assert data_files(committed(tmp_path / "roomy")) == expected


def test_the_memory_left_is_read_from_the_machine() -> None:
    available = asyncsave._available_memory()
    assert available is not None and available > 0
    assert not asyncsave._memory_tight(1)
    assert asyncsave._memory_tight(available)


class FailsSecondFile(RollingThreadOnly):
    """Writes a checkpoint's first data file, then fails (a disk that filled up)."""

    armed = False

    def write_stream(self, key: str, chunks: Any, size: int | None = None) -> None:
        if FailsSecondFile.armed and key.endswith("optimizer.safetensors"):
            for _ in zip(range(2), chunks, strict=False):  # it got going, then failed
                pass
            raise OSError(28, "No space left on device")
        super().write_stream(key, chunks, size)


def test_a_rolling_write_that_fails_midway_never_hangs_a_step_and_keeps_the_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Failing:
        @hookimpl
        def ckptkit_register_storage(self):
            return {"rollfail": FailsSecondFile}

    get_plugin_manager().register(Failing(), name="rolling-fail-backend")
    state = trained()
    url = f"rollfail://{tmp_path}/async"
    with CheckpointManager(url, run_name="r", async_save=True, async_snapshot="rolling") as mgr:
        mgr.save(1, state)
        mgr.wait()
        monkeypatch.setattr(FailsSecondFile, "armed", True)
        mgr.save(2, state)
        with pytest.raises(Exception, match="the disk is full"):
            mgr.wait()
        assert not asyncsave._IN_COPY  # nothing left for a step to take, or to hold
        stepper, errors = in_thread(lambda: train_steps(state, 2, seed=5))
        stepper.join(30)
        assert not stepper.is_alive() and not errors
        assert [c.step for c in mgr.list()] == [1]
