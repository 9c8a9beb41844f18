"""``async_save=True``: ``save()`` returns once a consistent snapshot is taken, the write
runs in a forked child (local disk) or a thread (elsewhere), the data files are those a
sync save writes, and a background error is raised by the next save / wait / close.

The process-level cases (SIGKILL during an async save, SIGTERM, interpreter exit) are in
tests/resume/test_async_save.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import sys
import threading
import time
import uuid
from typing import Any

import pytest
import torch

from ckptkit import CheckpointManager, asyncsave, hookimpl
from ckptkit.atomic import MarkerCommit, RenameCommit
from ckptkit.errors import StorageError
from ckptkit.hooks.manager import get_plugin_manager
from ckptkit.manifest import MANIFEST
from ckptkit.storage.base import join_key
from ckptkit.storage.local import LocalStorage
from tests.core.helpers import make_training, tensors_equal, train_steps
from tests.oshelpers import in_fork


class DiskOnly(LocalStorage):
    """``nolocal:///dir``: a local directory that does not say so (``local_path`` is
    None), as an object store would not: the async save takes its thread path."""

    def __init__(self, url: str) -> None:
        super().__init__(url.split("://", 1)[1])
        self.url = url

    def local_path(self, key: str) -> str | None:
        return None


class FlakyDisk(LocalStorage):
    """``flaky:///dir``: a local directory whose rename into ``step-000000000002*``
    (the commit of step 2) fails like a full disk."""

    def __init__(self, url: str) -> None:
        super().__init__(url.split("://", 1)[1])
        self.url = url

    def rename(self, src: str, dst: str) -> None:
        if dst.startswith("step-000000000002"):
            raise StorageError(f"{self.url_of(dst)}: no space left on device; free space")
        super().rename(src, dst)


class FlakyDiskOnly(FlakyDisk):
    def local_path(self, key: str) -> str | None:
        return None


class Backends:
    @hookimpl
    def ckptkit_register_storage(self):
        return {"nolocal": DiskOnly, "flaky": FlakyDisk, "flakyremote": FlakyDiskOnly}


@pytest.fixture(autouse=True)
def backends() -> None:
    get_plugin_manager().register(Backends(), name="async-test-backends")


@pytest.fixture(autouse=True)
def fork_any_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests' states are tiny beside the test process, which the rule (fork only a
    state at least half the process's memory) copies in a thread: here every local save
    forks, so that the fork writer is what they test. The rule has its own tests below."""
    monkeypatch.setattr(asyncsave, "_FORK_MIN_SHARE", 0.0, raising=False)


class Recording:
    """A commit strategy (the public ``commit=`` API) that records where each commit
    runs (pid and thread) and can fail the commit of one step, then delegates."""

    def __init__(self, inner: Any, log: str, fail_step: int | None = None) -> None:
        self.inner, self.log, self.fail_step = inner, log, fail_step
        self.name = inner.name

    def commit(self, storage: Any, target: str, *args: Any, **kwargs: Any) -> None:
        with open(self.log, "a") as f:
            f.write(json.dumps([target, os.getpid(), threading.current_thread().name]) + "\n")
        if self.fail_step is not None and target.startswith(f"step-{self.fail_step:012d}"):
            raise StorageError(f"{storage.url_of(target)}: injected failure; save again")
        self.inner.commit(storage, target, *args, **kwargs)

    def leftovers(self, storage: Any, names: list[str]) -> list[str]:
        return self.inner.leftovers(storage, names)

    def where(self) -> list[list[Any]]:
        with open(self.log) as f:
            return [json.loads(line) for line in f]


def training_state() -> dict[str, Any]:
    """A model with tied weights (two keys, one storage), AdamW moments, a scheduler, a
    non-contiguous view, plain values and a list the loop keeps appending to."""
    state = make_training(width=32)
    train_steps(state, 3)
    tied = torch.nn.Linear(6, 6, bias=False)
    tied_pair = torch.nn.ModuleDict({"a": tied, "b": torch.nn.Linear(6, 6, bias=False)})
    tied_pair["b"].weight = tied.weight
    state["tied"] = tied_pair
    state["view"] = torch.arange(24.0).reshape(4, 6).t()[1:]
    state["history"] = [1.5, 2.5]
    state["epoch"] = 2
    return state


def mutate(state: dict[str, Any]) -> None:
    """What the loop does right after save() returns: change every kind of value."""
    train_steps(state, 4, seed=9)
    with torch.no_grad():
        state["tied"]["a"].weight.add_(1.0)
        state["view"].mul_(-3.0)
    state["history"].append(99.0)


URLS = {
    "fork": lambda tmp: str(tmp / "async"),
    "thread-disk": lambda tmp: f"nolocal://{tmp}/async",
    "thread-memory": lambda tmp: f"memory://async-{uuid.uuid4().hex[:8]}/run",
}


def committed_files(mgr: CheckpointManager, name: str) -> dict[str, bytes]:
    info = next(c for c in mgr.list() if c.name == name)
    files = {f: mgr.storage.read_bytes(join_key(name, f)) for f in info.manifest.files}
    manifest = json.loads(mgr.storage.read_bytes(join_key(name, MANIFEST)))
    manifest.pop("created")
    files[MANIFEST] = json.dumps(manifest, sort_keys=True).encode()
    return files


@pytest.mark.parametrize("path", list(URLS))
def test_async_save_writes_the_files_a_sync_save_writes_of_the_state_at_save_time(
    path: str, tmp_path
) -> None:
    state = training_state()
    with CheckpointManager(str(tmp_path / "sync"), run_name="r") as sync:
        sync.save(5, state, {"loss": 0.25})
        expected = committed_files(sync, "step-000000000005")

    url = URLS[path](tmp_path)
    inner = MarkerCommit() if path == "thread-memory" else RenameCommit()
    strategy = Recording(inner, str(tmp_path / "commits.log"))
    with CheckpointManager(url, run_name="r", async_save=True, commit=strategy) as mgr:
        info = mgr.save(5, state, {"loss": 0.25})
        assert info is not None and info.name == "step-000000000005" and info.step == 5
        mutate(state)  # the loop goes on while the checkpoint is written
        mgr.wait()
        assert committed_files(mgr, info.name) == expected
        ((target, pid, thread),) = strategy.where()
        assert target == info.name
        if path == "fork":
            assert pid != os.getpid(), "the local save did not run in a forked child"
        else:
            assert pid == os.getpid() and thread != threading.main_thread().name

    fresh = training_state()
    mutate(fresh)
    with CheckpointManager(url, readonly=True) as reader:
        assert reader.restore(fresh) == 5
    reference = training_state()
    for key in ("model", "optimizer", "tied"):
        assert tensors_equal(fresh[key].state_dict(), reference[key].state_dict()), key
    assert fresh["tied"]["b"].weight is fresh["tied"]["a"].weight
    assert torch.equal(fresh["view"], reference["view"])
    assert fresh["history"] == [1.5, 2.5]


class Events:
    def __init__(self) -> None:
        self.seen: list[str] = []

    @hookimpl
    def ckptkit_before_save(self, manager, step, state):
        self.seen.append(f"before {step}")

    @hookimpl
    def ckptkit_after_save(self, manager, info):
        self.seen.append(f"after {info.step}")

    @hookimpl
    def ckptkit_after_commit(self, manager, info):
        self.seen.append(f"commit {info.step}")

    @hookimpl
    def ckptkit_before_delete(self, manager, info):
        self.seen.append(f"delete {info.step}")


@pytest.mark.parametrize("path", ["fork", "thread-disk"])
def test_one_save_in_flight_each_finished_before_the_next_starts(path: str, tmp_path) -> None:
    events = Events()
    get_plugin_manager().register(events)
    state = training_state()
    with CheckpointManager(URLS[path](tmp_path), keep_last=2, async_save=True) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, state)
            train_steps(state, 1)
        assert "after 3" not in events.seen  # still in flight
    assert events.seen == [
        "before 1",
        *("after 1", "commit 1", "before 2"),
        *("after 2", "commit 2", "before 3"),
        *("after 3", "commit 3", "delete 1"),
    ]
    with CheckpointManager(URLS[path](tmp_path), readonly=True) as reader:
        assert [c.step for c in reader.list()] == [2, 3]


def test_maybe_save_finishes_a_committed_background_save_without_blocking(tmp_path) -> None:
    events = Events()
    get_plugin_manager().register(events)
    state = training_state()
    with CheckpointManager(str(tmp_path / "r"), save_every_steps=100, async_save=True) as mgr:
        assert mgr.maybe_save(100, state) is not None
        deadline = time.monotonic() + 60
        while "after 100" not in events.seen and time.monotonic() < deadline:
            assert mgr.maybe_save(101, state) is None  # no save due: only a poll
            time.sleep(0.01)
        assert "commit 100" in events.seen, "maybe_save never collected the finished save"


FAILING = {
    "fork, commit strategy": (lambda tmp: str(tmp / "r"), True),
    "thread, commit strategy": (lambda tmp: f"nolocal://{tmp}/r", True),
    "fork, storage plugin": (lambda tmp: f"flaky://{tmp}/r", False),
    "thread, storage plugin": (lambda tmp: f"flakyremote://{tmp}/r", False),
}


@pytest.mark.parametrize("surfaces", ["save", "wait", "close"])
@pytest.mark.parametrize("how", list(FAILING))
def test_a_background_error_is_raised_by_the_next_save_wait_or_close(
    how: str, surfaces: str, tmp_path
) -> None:
    url_of, by_strategy = FAILING[how]
    url = url_of(tmp_path)
    strategy = (
        Recording(RenameCommit(), str(tmp_path / "log"), fail_step=2) if by_strategy else None
    )
    state = training_state()
    mgr = CheckpointManager(url, async_save=True, commit=strategy)
    try:
        mgr.save(1, state)
        info = mgr.save(2, state)  # step 1 committed; step 2's commit fails in the background
        assert info is not None and info.step == 2
        with pytest.raises(StorageError, match="step-000000000002") as raised:
            if surfaces == "save":
                mgr.save(3, state)
            elif surfaces == "wait":
                mgr.wait()
            else:
                mgr.close()
        notes = " ".join(getattr(raised.value, "__notes__", []))
        assert "background save of step 2" in notes or not hasattr(raised.value, "add_note")
        if surfaces != "close":
            mgr.wait()  # raised once, not again
            assert [c.step for c in mgr.list()] == [1]
            mgr.save(4, state)  # the run goes on
            mgr.wait()
            assert [c.step for c in mgr.list()] == [1, 4]
    finally:
        mgr.close()
    with CheckpointManager(url, readonly=True) as reader:
        latest = reader.latest()
        assert latest is not None and latest.step == (1 if surfaces == "close" else 4)


def test_the_snapshot_copy_keeps_shared_storage_and_needs_no_grad(tmp_path) -> None:
    """Thread path: a tensor that requires grad, a view sharing storage with another value,
    an empty tensor and a numpy array all survive the copy as a sync save sees them."""
    import numpy as np

    base = torch.arange(10.0)
    state = {
        "a": base,
        "b": base[2:5],
        "empty": torch.empty(0),
        "grad": torch.ones(3, requires_grad=True),
        "np": np.arange(4),
        "nested": {"x": [base[:2], (torch.zeros(2, dtype=torch.int64),)]},
    }
    with CheckpointManager(str(tmp_path / "sync"), run_name="r") as sync:
        sync.save(1, state)
        expected = committed_files(sync, "step-000000000001")
    url = f"nolocal://{tmp_path}/async"
    with CheckpointManager(url, run_name="r", async_save=True) as mgr:
        mgr.save(1, state)
        base.add_(100.0)
        mgr.wait()
        assert committed_files(mgr, "step-000000000001") == expected


def test_state_in_shared_memory_is_copied_not_forked(tmp_path) -> None:
    """A forked child would see the parent's later writes to shared memory (Hogwild's
    ``share_memory()``): such a state takes the copying thread path, and the checkpoint
    is still the state at save time."""
    state = training_state()
    state["model"].share_memory()
    with CheckpointManager(str(tmp_path / "sync"), run_name="r") as sync:
        sync.save(1, state)
        expected = committed_files(sync, "step-000000000001")
    strategy = Recording(RenameCommit(), str(tmp_path / "log"))
    with CheckpointManager(
        str(tmp_path / "async"), run_name="r", async_save=True, commit=strategy
    ) as mgr:
        mgr.save(1, state)
        mutate(state)
        mgr.wait()
        assert committed_files(mgr, "step-000000000001") == expected
    ((_, pid, _),) = strategy.where()
    assert pid == os.getpid()


def test_a_save_from_another_thread_writes_in_a_thread(tmp_path) -> None:
    """PR_SET_PDEATHSIG follows the thread that forked: a save called from a thread that
    may end first is written by a thread instead."""
    state = training_state()
    strategy = Recording(RenameCommit(), str(tmp_path / "log"))
    mgr = CheckpointManager(str(tmp_path / "r"), async_save=True, commit=strategy)
    worker = threading.Thread(target=mgr.save, args=(1, state))
    worker.start()
    worker.join()
    mgr.close()
    ((_, pid, _),) = strategy.where()
    assert pid == os.getpid()
    with CheckpointManager(str(tmp_path / "r"), readonly=True) as reader:
        assert [c.step for c in reader.list()] == [1]


class HoldInChild(RenameCommit):
    """Writes its pid to ``path``, then never commits (in a forked writer only; it gives
    up after two minutes, so that a test that fails to kill it fails instead of hanging
    its worker)."""

    def __init__(self, path: str) -> None:
        self.path, self.parent = path, os.getpid()

    def commit(self, storage: Any, target: str, *args: Any, **kwargs: Any) -> None:
        if os.getpid() != self.parent:
            with open(self.path, "w") as f:
                f.write(str(os.getpid()))
            for _ in range(120):
                time.sleep(1)
            os._exit(9)
        super().commit(storage, target, *args, **kwargs)


@pytest.mark.parametrize("taken_by", ["the waiting thread", "another thread"])
def test_an_interrupted_close_leaves_no_writer_behind(tmp_path, taken_by: str) -> None:
    """Ctrl+C while close() waits: the lock goes, and so must the forked writer. Also
    when the kernel hands the SIGINT to another thread of the process: the wait still
    notices it within a fraction of a second (it would otherwise block until the
    writer is done: here, two minutes)."""
    import signal

    pid_file = str(tmp_path / "writer.pid")
    url = str(tmp_path / "r")
    mgr = CheckpointManager(url, async_save=True, commit=HoldInChild(pid_file))
    mgr.save(1, training_state())
    deadline = time.monotonic() + 60
    while not os.path.exists(pid_file) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    with open(pid_file) as f:
        writer = int(f.read())
    waiting = threading.get_ident()

    def interrupt() -> None:
        target = waiting if taken_by == "the waiting thread" else threading.get_ident()
        signal.pthread_kill(target, signal.SIGINT)

    timer = threading.Timer(0.5, interrupt)
    started = time.monotonic()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        mgr.close()
    assert time.monotonic() - started < 30
    timer.join()
    with pytest.raises(ProcessLookupError):
        os.kill(writer, 0)  # killed and reaped
    with CheckpointManager(url) as again:  # the lock was released
        assert again.list() == []


def _peak_rss_growth(action: Any) -> int | None:
    """Growth of this process's peak RSS over ``action()`` (None where the peak cannot
    be reset)."""

    def status_kb(field: str) -> int:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith(field + ":"))
        return int(line.split()[1])

    # Memory earlier tests freed but malloc kept resident would serve the action
    # without any growth (which test ran before depends on the xdist worker): hand it
    # back first, so what the action allocates shows.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak RSS := the current RSS
    except OSError:
        return None
    before = status_kb("VmRSS")
    action()
    return (status_kb("VmHWM") - before) * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fork writer is Linux-only")
def test_the_writer_is_chosen_by_the_states_share_of_the_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """A state small beside the process is copied and written by a thread (a fork would
    cost, and share, the whole process); one that is a large share of it is forked."""
    with open("/proc/self/statm") as f:
        resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    big = {"w": torch.randn(resident // 4 // 10)}  # a tenth of the process
    small = {"w": torch.randn(1000)}
    monkeypatch.setattr(asyncsave, "_FORK_MIN_SHARE", 0.05, raising=False)
    strategy = Recording(RenameCommit(), str(tmp_path / "log"))
    with CheckpointManager(str(tmp_path / "r"), async_save=True, commit=strategy) as mgr:
        mgr.save(1, small)
        mgr.wait()
        mgr.save(2, big)
        mgr.wait()
    (_, small_pid, small_thread), (_, big_pid, _) = strategy.where()
    assert small_pid == os.getpid() and small_thread != threading.main_thread().name
    assert big_pid != os.getpid(), "a state a tenth of the process was not forked"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/clear_refs")
def test_a_small_state_is_copied_into_one_buffer_kept_from_save_to_save(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """The thread writer's copy: the data files are a sync save's, the first save needs
    about one copy of the state, and the next saves reuse it (no new memory, no page
    faults); close() frees it."""
    monkeypatch.setattr(asyncsave, "_FORK_MIN_SHARE", 0.5, raising=False)
    state = training_state()
    state["big"] = torch.randn(6_000_000)  # 24 MB: what the copy's memory shows
    size = state["big"].nbytes
    with CheckpointManager(str(tmp_path / "sync"), run_name="r") as sync:
        sync.save(1, state)
        expected = committed_files(sync, "step-000000000001")
    strategy = Recording(RenameCommit(), str(tmp_path / "log"))
    url = str(tmp_path / "async")
    with CheckpointManager(url, run_name="r", async_save=True, commit=strategy) as mgr:

        def save(step: int) -> None:
            mgr.save(step, state)
            mutate(state)
            with torch.no_grad():
                state["big"].mul_(2.0)
            mgr.wait()

        first = _peak_rss_growth(lambda: save(1))
        assert committed_files(mgr, "step-000000000001") == expected
        again = _peak_rss_growth(lambda: save(2))
    assert {pid for _, pid, _ in strategy.where()} == {os.getpid()}
    if first is not None and again is not None:
        assert 0.9 * size < first < 1.5 * size, "the first save's copy is not one copy"
        assert again < 0.25 * size, "the next save allocated its copy again"


@pytest.mark.parametrize("copiers", ["one thread", "two threads, tiny pieces"])
def test_the_kept_buffer_copies_every_dtype_view_and_layout_change_exactly(
    monkeypatch: pytest.MonkeyPatch, tmp_path, copiers: str
) -> None:
    """The thread writer's one buffer, reused and regrown: storages of odd sizes and mixed
    dtypes side by side (each copy aligned for any dtype), two dtypes viewing one storage,
    a view at an offset, a state that grows, then shrinks, then changes its tensors;
    every checkpoint's files are a sync save's, though the loop changes it all after
    ``save()`` returns. Also with the copy shared by two threads in pieces that split
    every storage at odd byte counts."""
    monkeypatch.setattr(asyncsave, "_FORK_MIN_SHARE", float("inf"), raising=False)
    if copiers != "one thread":
        monkeypatch.setattr(asyncsave, "_PARALLEL_MIN", 0)
        monkeypatch.setattr(asyncsave, "_PIECE", 37)
        monkeypatch.setattr(asyncsave, "_cores", lambda: 2)
    floats = torch.randn(7)
    base = torch.arange(13, dtype=torch.float64)

    def states() -> list[dict[str, Any]]:
        return [
            {
                "i8": torch.arange(3, dtype=torch.int8),
                "f64": base[1:],
                "bits": floats.view(torch.int32),
                "floats": floats,
                "bf16": torch.randn(5).to(torch.bfloat16),
                "flag": torch.tensor([True, False, True]),
                "c64": torch.randn(3, dtype=torch.complex64),
            },
            {"big": torch.randn(300, 7).t(), "i8": torch.arange(9, dtype=torch.int8)},
            {"one": torch.tensor(2.5)},
            {"i16": torch.arange(11, dtype=torch.int16), "f64": torch.randn(4, 3).double()},
        ]

    with (
        CheckpointManager(str(tmp_path / "sync"), run_name="r", keep_last=None) as sync,
        CheckpointManager(
            str(tmp_path / "async"), run_name="r", keep_last=None, async_save=True
        ) as mgr,
    ):
        for step, state in enumerate(states(), start=1):
            sync.save(step, state)
            mgr.save(step, state)
            for t in state.values():
                t.zero_()  # after save() returns: the snapshot must not see it
            base.add_(1.0)
            mgr.wait()
            name = f"step-{step:012d}"
            assert committed_files(mgr, name) == committed_files(sync, name), name


def test_the_thread_snapshot_keeps_every_container_and_leaf_kind(tmp_path) -> None:
    """Sizes, dtypes, a namedtuple and a mapping holding tensors, an OrderedDict, nested
    lists and tuples, numpy arrays: written by the thread path exactly as a sync save
    writes them, though the loop changes each tensor and array after ``save()``."""
    import collections

    import numpy as np

    class Stats:
        def __init__(self) -> None:
            self.w = torch.arange(4.0)

        def state_dict(self) -> dict[str, Any]:
            pair = collections.namedtuple("Pair", "a b")
            return {
                "size": torch.Size([2, 3]),
                "dtype": torch.float16,
                "pair": pair(self.w, torch.ones(2)),
                "ordered": collections.OrderedDict(x=self.w[1:], y=[1, (2, self.w)]),
                "np": np.arange(3.0),
                "none": None,
                "bytes": b"\x00\x01",
            }

        def load_state_dict(self, sd: dict[str, Any]) -> None:
            pass

    stats = Stats()
    state = {"stats": stats}
    with CheckpointManager(str(tmp_path / "sync"), run_name="r") as sync:
        sync.save(1, state)
        expected = committed_files(sync, "step-000000000001")
    with CheckpointManager(f"nolocal://{tmp_path}/async", run_name="r", async_save=True) as mgr:
        mgr.save(1, state)
        stats.w.add_(10.0)
        mgr.wait()
        assert committed_files(mgr, "step-000000000001") == expected


def test_a_failed_piece_of_the_two_thread_copy_fails_the_snapshot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A piece the helper thread could not copy leaves the snapshot incomplete: the error
    is raised by the copy (so by save()), after both threads stopped, never a hang or a
    silently partial copy."""
    monkeypatch.setattr(asyncsave, "_cores", lambda: 2)
    src = torch.arange(64, dtype=torch.uint8)
    dst = torch.zeros(64, dtype=torch.uint8)
    pieces = [(dst.data_ptr() + i, src.data_ptr() + i, 1) for i in range(64)]
    real = ctypes.memmove
    main = threading.get_ident()

    def memmove(d: int, s: int, n: int) -> Any:
        if threading.get_ident() != main:
            raise OSError("injected: the helper's copy failed")
        time.sleep(0.001)  # let the helper take pieces
        return real(d, s, n)

    monkeypatch.setattr(asyncsave.ctypes, "memmove", memmove)
    with pytest.raises(OSError, match="injected"):
        asyncsave._copy_pieces(pieces, 1 << 30)
    monkeypatch.setattr(asyncsave.ctypes, "memmove", real)
    asyncsave._copy_pieces(pieces, 1 << 30)
    assert torch.equal(dst, src)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_the_kept_copy_is_left_out_of_forks_and_never_unmapped_in_a_child(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    """The kept snapshot buffer is not mapped in a forked child (a DataLoader worker
    forked between saves), so the parent's next copy finds its pages still its own; the
    child, which inherits the Python objects that own the mapping, keeps them for good
    (freeing one would munmap whatever the child mapped there since) and runs on."""
    monkeypatch.setattr(asyncsave, "_FORK_MIN_SHARE", float("inf"), raising=False)
    state = {"w": torch.randn(3_000_000)}
    with CheckpointManager(str(tmp_path / "run"), run_name="r", async_save=True) as mgr:
        mgr.save(1, state)
        mgr.wait()
        flat = mgr._background._buffers._flat
        start = flat.data_ptr()

        def child() -> list[Any]:  # whether the range is mapped; free, remap, check
            with open("/proc/self/maps") as f:
                mapped = any(
                    int(lo, 16) <= start < int(hi, 16)
                    for lo, hi in (line.split()[0].split("-") for line in f)
                )
            kept = len(asyncsave._KEPT_IN_CHILD) >= 1
            mgr._background._buffers.release()
            import gc

            gc.collect()
            fresh = bytearray(64 << 20)  # may land where the parent's copy is
            fresh[-1] = 7
            return [mapped, kept, fresh[-1]]

        del flat
        report = in_fork(child)
        assert report == [False, True, 7]
        state["w"].add_(1.0)
        mgr.save(2, state)  # the parent's buffer is intact and still used
        mgr.wait()
        assert mgr._background._buffers._flat.data_ptr() == start
        restored = {"w": torch.zeros(3_000_000)}
        mgr.restore(restored)
        assert torch.equal(restored["w"], state["w"])
