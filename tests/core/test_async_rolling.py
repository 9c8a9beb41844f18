"""The streamed and rolling deferred copies of an async save, on a storage that
``releases_chunks`` (local disks).

Streamed (the default there): the writer streams each optimizer-owned storage straight
from the live tensors and copies nothing; the loop's next optimizer step (or a restore)
copies whatever is not written yet itself, at once, instead of waiting for the disk,
and waits only for the one live piece the writer may be reading. Rolling
(``async_snapshot="rolling"``, or a streamed copy where memory is tight): the same, and
each copied storage is freed once every file entry over it is written.

Each test holds the writer after it streamed its first tensor (``mid_file``), so that
part of the state is written and the rest is not, then checks the committed data files
byte for byte against a sync save of the state as it was at ``save()``.
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
from ckptkit.storage import base as storage_base
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


def trained(width: int = 16) -> dict[str, Any]:
    """A trained state; ``width=16384``: ~1.4 MB, hundreds of pages."""
    state = make_training(width=width)
    train_steps(state, 2)
    return state


def rolling(tmp_path: Path, snapshot: str = "rolling") -> CheckpointManager:
    return CheckpointManager(
        f"rolling://{tmp_path}/async", run_name="r", async_save=True, async_snapshot=snapshot
    )


def touched_pages(mgr: CheckpointManager) -> int:
    """Pages of the kept snapshot buffer holding anything: what a copy wrote (and kept)."""
    flat = mgr._background._buffers._flat
    pages = flat[: flat.numel() // 4096 * 4096].view(-1, 4096)
    return int((pages != 0).any(dim=1).sum())


@pytest.mark.parametrize("snapshot", ["deferred", "rolling"])
def test_a_step_during_a_streamed_save_copies_the_rest_itself_and_never_waits_for_the_disk(
    tmp_path: Path, mid_file: MidFile, snapshot: str
) -> None:
    state = trained()
    expected = sync_files(tmp_path, state, 3)
    with rolling(tmp_path, snapshot) as mgr:
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


@pytest.mark.parametrize("snapshot", ["deferred", "rolling"])
def test_a_change_outside_step_before_its_copy_fails_the_save_but_not_after_it(
    tmp_path: Path, mid_file: MidFile, snapshot: str
) -> None:
    state = trained()
    params = list(state["model"].parameters())
    expected = sync_files(tmp_path, state, 2)
    with rolling(tmp_path, snapshot) as mgr:
        mgr.save(2, state)
        assert mid_file.started.wait(10)
        with torch.no_grad():  # the first tensor is written already: harmless
            params[0].add_(1.0)
        mid_file.release()
        mgr.wait()
        assert data_files(committed(tmp_path / "async")) == expected

        mid_file.go.clear()
        mid_file.started.clear()
        mid_file.calls = 0
        mgr.save(3, state)
        assert mid_file.started.wait(10)
        with torch.no_grad():  # the last parameter is not written yet: a torn snapshot
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


def test_a_save_over_before_the_next_step_copies_nothing(tmp_path: Path) -> None:
    state = trained(width=16384)
    expected = sync_files(tmp_path, state, 1)
    with rolling(tmp_path, "deferred") as mgr:
        mgr.save(1, state)
        mgr.wait()
        # Every owned tensor was streamed from the live state: no page of its copy was
        # ever written (what save() copied itself, the tensors no optimizer owns, is a
        # few pages at most here).
        flat = mgr._background._buffers._flat
        assert touched_pages(mgr) <= 2 and flat.numel() // 4096 > 300
    assert data_files(committed(tmp_path / "async")) == expected


def test_a_streamed_copy_keeps_what_a_step_copied_and_rolls_where_memory_is_tight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mid_file: MidFile
) -> None:
    expected = sync_files(tmp_path, trained(width=16384), 1)

    def kept_pages(url: str) -> int:
        """Save a fresh state, step once while the writer is held, and count the pages
        of the copy kept after the commit."""
        mid_file.go.clear()
        mid_file.started.clear()
        mid_file.calls = 0
        state = trained(width=16384)
        with CheckpointManager(url, run_name="r", async_save=True) as mgr:
            mgr.save(1, state)
            assert mid_file.started.wait(10)
            train_steps(state, 1, seed=4)  # copies what is not written yet
            mid_file.release()
            mgr.wait()
            return touched_pages(mgr)

    roomy = kept_pages(f"rolling://{tmp_path}/roomy")  # the step's copy, kept
    assert roomy > 100
    monkeypatch.setattr(asyncsave, "_available_memory", lambda: 1_000_000)  # < 2 copies
    tight = kept_pages(f"rolling://{tmp_path}/tight")  # freed once written
    assert tight < roomy // 10, (tight, roomy)
    assert data_files(committed(tmp_path / "roomy")) == expected
    assert data_files(committed(tmp_path / "tight")) == expected


class HoldsALivePiece(RollingThreadOnly):
    """Keeps the first tensor bytes of the model file it is handed, unwritten, until
    ``go``: a disk slow to take a write. The bytes are written only then."""

    releases_chunks = True  # each chunk is written before the next is asked for
    held = threading.Event()
    go = threading.Event()

    def write_stream(self, key: str, chunks: Any, size: int | None = None) -> None:
        if not key.endswith("model.safetensors"):
            return super().write_stream(key, chunks, size)

        def slow() -> Iterator[memoryview]:
            for i, chunk in enumerate(chunks):
                if i == 1:  # the header first, then the first tensor, read live
                    HoldsALivePiece.held.set()
                    assert HoldsALivePiece.go.wait(60)
                yield chunk

        return super().write_stream(key, slow(), size)


@pytest.fixture
def slow_disk() -> Iterator[str]:
    """``slowdisk://``: a disk that holds the model file's first tensor (HoldsALivePiece)."""

    class Slow:
        @hookimpl
        def ckptkit_register_storage(self):
            return {"slowdisk": HoldsALivePiece}

    get_plugin_manager().register(Slow(), name="rolling-slow-backend")
    HoldsALivePiece.held.clear()
    HoldsALivePiece.go.clear()
    yield "slowdisk"
    HoldsALivePiece.go.set()  # a failing test must not leave a writer parked


def test_a_step_waits_for_the_live_piece_the_writer_is_reading_and_no_longer(
    tmp_path: Path, slow_disk: str
) -> None:
    state = trained()
    expected = sync_files(tmp_path, state, 1)
    url = f"{slow_disk}://{tmp_path}/async"
    with CheckpointManager(url, run_name="r", async_save=True) as mgr:
        try:
            mgr.save(1, state)
            assert HoldsALivePiece.held.wait(10)
            stepper, errors = in_thread(lambda: train_steps(state, 2, seed=6))
            # The step copies the rest, then waits: the writer still reads the live
            # tensor, and a step now would write it under the read (a torn file).
            stepper.join(1.0)
            assert stepper.is_alive(), "a step wrote a tensor the writer was reading"
        finally:
            HoldsALivePiece.go.set()
        stepper.join(30)
        assert not stepper.is_alive() and not errors, errors
        mgr.wait()
    assert data_files(committed(tmp_path / "async")) == expected


def test_the_memory_left_is_read_from_the_machine() -> None:
    available = asyncsave._available_memory()
    assert available is not None and available > 0
    assert not asyncsave._memory_tight(1)
    assert asyncsave._memory_tight(available)


class FailsSecondFile(RollingThreadOnly):
    """Writes a checkpoint's first data file, then fails (a disk that filled up)."""

    releases_chunks = True  # its write_stream still is done with each chunk at once
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


def test_a_change_outside_step_to_the_tensor_being_streamed_fails_the_save(
    tmp_path: Path, slow_disk: str
) -> None:
    state = trained()
    url = f"{slow_disk}://{tmp_path}/async"
    with CheckpointManager(url, run_name="r", async_save=True) as mgr:
        HoldsALivePiece.go.set()  # the first save goes through
        mgr.save(1, state)
        mgr.wait()
        HoldsALivePiece.held.clear()
        HoldsALivePiece.go.clear()
        mgr.save(2, state)
        try:
            assert HoldsALivePiece.held.wait(10)
            with torch.no_grad():  # the model file's first tensor, read live right now
                next(iter(state["model"].state_dict(keep_vars=True).values())).add_(1.0)
        finally:
            HoldsALivePiece.go.set()
        with pytest.raises(ConfigError, match="changed in place after save"):
            mgr.wait()
        assert [c.step for c in mgr.list()] == [1]


class KeepsChunks(RollingThreadOnly):
    """A plugin's disk that gathers a file's chunks and writes them once all are in (as
    an uploader might): it overrides write_stream without saying it releases chunks."""

    def write_stream(self, key: str, chunks: Any, size: int | None = None) -> None:
        kept = list(chunks)  # views of whatever memory the save streams from
        HoldsALivePiece.held.set()
        assert HoldsALivePiece.go.wait(60)
        super().write_stream(key, kept, size)


def test_a_disk_subclass_that_keeps_chunks_gets_the_whole_copy_not_live_memory(
    tmp_path: Path,
) -> None:
    class Keeping:
        @hookimpl
        def ckptkit_register_storage(self):
            return {"keeps": KeepsChunks}

    get_plugin_manager().register(Keeping(), name="rolling-keeps-backend")
    assert not storage_base.releases_chunks(KeepsChunks(f"keeps://{tmp_path}/x"))
    assert storage_base.releases_chunks(RollingThreadOnly(f"rolling://{tmp_path}/x"))
    HoldsALivePiece.held.clear()
    HoldsALivePiece.go.clear()
    state = trained()
    expected = sync_files(tmp_path, state, 1)
    url = f"keeps://{tmp_path}/async"
    with CheckpointManager(url, run_name="r", async_save=True) as mgr:
        try:
            mgr.save(1, state)
            assert HoldsALivePiece.held.wait(10)
            train_steps(state, 2, seed=8)  # the chunks it kept must not change
        finally:
            HoldsALivePiece.go.set()
        mgr.wait()
    assert data_files(committed(tmp_path / "async")) == expected


def test_an_owned_inference_tensor_has_no_version_counter_so_all_is_copied_in_save(
    tmp_path: Path,
) -> None:
    state = trained()
    opt = state["optimizer"]
    first = next(iter(opt.state))
    with torch.inference_mode():  # an optimizer state tensor made under inference_mode
        opt.state[first]["extra"] = torch.ones(3)
    expected = sync_files(tmp_path, state, 1)
    with rolling(tmp_path, "deferred") as mgr:
        mgr.save(1, state)
        train_steps(state, 2, seed=3)  # right away: the copy was taken inside save()
        mgr.wait()
        assert not asyncsave._IN_COPY
    assert data_files(committed(tmp_path / "async")) == expected
