"""Async save: ``save()`` returns once a consistent snapshot of the state is taken; the
encode, checksums and commit (``CheckpointManager._write``) run in the background, and
the manager finishes the save (hooks, retention) when it collects the result.

Two writers, chosen per save (docs/RESUME.md, "Async save"):

- **fork** (Linux, a local filesystem, every tensor on the CPU, called from the main
  thread, and the state at least half of the process's resident memory: a fork costs,
  and shares with the child, the whole process): the parent forks right after
  ``collect_state``; the child's copy-on-write view
  of memory *is* the snapshot, so ``save()`` blocks only for the fork. The child writes and
  commits, reports over a pipe and ``os._exit``\\ s. It dies with its parent
  (``PR_SET_PDEATHSIG``) and checks that its parent lives before the commit itself, so a
  killed run never has a second writer; it touches none of the parent's threads (lock
  heartbeat, uploaders, event loops) and runs no atexit handler.
- **thread** (everything else: a state small beside the process, gs://, memory://,
  drive://, CUDA tensors): the state is copied into buffers kept from save to save
  (CPU: one flat buffer, a memcpy per storage; CUDA: device to host into pinned buffers
  on a side stream, synchronized before it returns), then a thread writes the copy.
  What the state's optimizers own (their parameters and state: most of a training
  state) is taken after ``save()`` returns, before each optimizer's next ``step()``
  (``async_snapshot="deferred"``, the default; see ``_DeferredCopy``): on a local disk
  streamed from the live tensors, the step copying only what is not written yet;
  elsewhere copied by that thread first, the step waiting for it. The rest is copied
  inside ``save()``, which then blocks only for walking the state (~3 ms for 592
  tensors). ``async_snapshot="eager"`` copies everything inside ``save()``.

At most one save is in flight: the next ``save`` first waits for the previous one. A
background error is raised by the next ``save``/``wait``/``close`` (and printed at
interpreter exit when the manager was never closed), never dropped.
"""

from __future__ import annotations

import _thread
import atexit
import bisect
import contextlib
import copy
import ctypes
import gc
import json
import mmap
import os
import select
import signal
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from ckptkit import run as runmod
from ckptkit.errors import CkptError, ConfigError
from ckptkit.formats import native
from ckptkit.manifest import MANIFEST
from ckptkit.run import CheckpointInfo
from ckptkit.storage import base as storage_base

if TYPE_CHECKING:
    from ckptkit.manager import CheckpointManager
    from ckptkit.manifest import Manifest

_PR_SET_PDEATHSIG = 1
# Room for the child's report in an empty pipe (64 KiB on Linux): its one write never
# blocks, so the parent may reap the child before reading.
_MAX_REPORT = 32 * 1024
_ORPHANED = 3  # the child's exit status when its parent died before the commit
# Signals a training process may handle (SignalTrigger): the writer ignores them, since
# its life is bound to the parent's, which decides whether to wait for it.
_STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")


SNAPSHOTS = ("deferred", "rolling", "eager")  # CheckpointManager(async_snapshot=...)


class AsyncSaver:
    """The manager's background writer: one save in flight at a time."""

    def __init__(self, manager: CheckpointManager, snapshot: str = "deferred") -> None:
        self.manager = manager
        self._pending: _Pending | None = None
        self._buffers = _HostBuffers()
        self._defer = snapshot != "eager"
        self._rolling = snapshot == "rolling"

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def submit(
        self,
        collected: dict[str, Any],
        manifest: Manifest,
        existing: list[CheckpointInfo],
        started: float,
        objects: Mapping[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Start writing ``collected``; return the CheckpointInfo it will be committed as
        (its manifest has no file entries yet). The caller waited for any previous save.
        ``objects``: the state ``collected`` came from (its optimizers say which tensors
        may be copied after this returns: see ``_owned``)."""
        mgr = self.manager
        name = mgr._next_name(manifest.step)
        info = CheckpointInfo(name=name, url=mgr.storage.url_of(name), manifest=manifest)
        found = _Tensors(collected)
        if _can_fork(mgr, found):
            self._buffers.release()  # a copy of a smaller state is not needed any more
            try:
                job: _Job = _ForkedWrite(mgr, collected, manifest, name)
            except OSError:  # no memory to fork a large process (strict overcommit)
                job = self._threaded(collected, found, manifest, name, objects)
        else:
            job = self._threaded(collected, found, manifest, name, objects)
        now = time.monotonic()
        # Told now, not when the result is collected: an interval trigger must not fire
        # again at the next step only because the write is still running.
        for trigger in mgr.triggers:
            trigger.saved(manifest.step, now)
        self._pending = _Pending(job, info, existing, blocked=now - started)
        _IN_FLIGHT[id(self)] = self  # held until finished: never dropped with its manager
        return info

    def _threaded(
        self,
        collected: dict[str, Any],
        found: _Tensors,
        manifest: Manifest,
        name: str,
        objects: Mapping[str, Any] | None,
    ) -> _Job:
        owned = _owned(objects) if self._defer and objects is not None else set()
        snapshot = self._buffers.snapshot(collected, found, owned)
        # Rolling where asked, or where a copy of the state would leave too little memory
        # (a deferred copy then rolls by itself): see _DeferredCopy.
        rolling = self._rolling or (bool(owned) and _memory_tight(found.cpu_bytes()))
        return _ThreadWrite(self.manager, snapshot, manifest, name, rolling)

    def settle(self) -> None:
        """Wait until the save in flight no longer reads the live state (its deferred
        copy is taken): the state may then be changed in place (a restore)."""
        pending = self._pending
        if pending is not None:
            pending.job.settle()

    def poll(self) -> None:
        """Finish the save in flight if its writer is done (never blocks on it)."""
        if self._pending is not None and self._pending.job.done():
            self.wait()

    def wait(self) -> CheckpointInfo | None:
        """Block until the save in flight is committed and finished; raise its error
        (once). Interrupted while waiting (Ctrl+C), the save stays in flight."""
        pending = self._pending
        if pending is None:
            return None
        mgr = self.manager
        try:
            info, seconds = pending.job.result()
        except BaseException as exc:
            if not pending.job.finished():
                raise  # the wait was interrupted, not the write: wait again later
            self._forget()
            _add_note(
                exc,
                f"raised by the background save of step {pending.info.step} "
                f"({pending.info.name}, async_save=True): that checkpoint was not committed",
            )
            raise
        self._forget()
        mgr.storage.invalidate()  # another process (the child) wrote the run
        mgr._run_info_pending = False  # written with this save (in the child, for a fork)
        # The duration the time-limit trigger plans with: blocked + background, not the
        # training that ran while the write went on.
        started = time.monotonic() - pending.blocked - seconds
        mgr._finish(info, pending.existing, started, tell_triggers=False)
        return info

    def abandon(self) -> None:
        """Called by every ``close()``: free the kept snapshot buffers, and stop waiting
        for a save still in flight (``close()`` interrupted, say by a second Ctrl+C): a
        forked writer is killed, since the run lock is about to be released and no
        writer may outlive it; its half-written checkpoint stays invisible."""
        pending = self._pending
        if pending is not None:
            self._forget()
            pending.job.cancel()
        self._buffers.release()

    def _forget(self) -> None:
        self._pending = None
        _IN_FLIGHT.pop(id(self), None)


# Every saver with a save in flight, finished at interpreter exit (a manager never closed,
# or one whose close() was interrupted): its checkpoint is committed, or its error said.
_IN_FLIGHT: dict[int, AsyncSaver] = {}


def _finish_at_exit() -> None:
    for saver in list(_IN_FLIGHT.values()):
        try:
            saver.manager.wait()
        except Exception as exc:  # noqa: BLE001 - at exit: say it on stderr, in one line
            print(
                f"ckptkit: error: a save in flight at exit failed: {exc}",
                file=sys.stderr,
                flush=True,
            )


# Run where Python joins its non-daemon threads, before any atexit handler (as when the
# thread writer was one): a handler registered after ckptkit's import (a storage
# library's cleanup) must not run before the write it may serve is finished.
_at_shutdown = getattr(threading, "_register_atexit", None)
if _at_shutdown is not None:
    _at_shutdown(_finish_at_exit)
else:  # pragma: no cover - Python < 3.9 has no such hook
    atexit.register(_finish_at_exit)


class _Pending:
    def __init__(
        self, job: _Job, info: CheckpointInfo, existing: list[CheckpointInfo], blocked: float
    ) -> None:
        self.job, self.info, self.existing, self.blocked = job, info, existing, blocked


class _Job:
    def done(self) -> bool:
        """The writer is done (``result`` will not block on it)."""
        raise NotImplementedError

    def finished(self) -> bool:
        """``result`` has collected the outcome (an exception from it is the write's)."""
        raise NotImplementedError

    def cancel(self) -> None:
        """Give the write up, as far as it can be: a thread finishes its atomic commit."""

    def settle(self) -> None:
        """Return once the writer no longer reads the live state (a fork never does)."""

    def result(self) -> tuple[CheckpointInfo, float]:
        """The committed checkpoint and the seconds the write took; raises its error."""
        raise NotImplementedError


# -- the thread writer ---------------------------------------------------------------


class _ThreadWrite(_Job):
    def __init__(
        self,
        mgr: CheckpointManager,
        snapshot: _Snapshot,
        manifest: Manifest,
        name: str,
        rolling: bool = False,
    ) -> None:
        self._out: tuple[CheckpointInfo, float] | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()

        self._snapshot = snapshot

        def write() -> None:
            t0 = time.monotonic()
            try:
                deferred = snapshot.deferred
                deferred.run()  # first (unless streamed): the loop's next step waits for it
                watch = deferred if deferred.streamed else None
                info = mgr._write(snapshot.tree(), manifest, name=name, watch=watch)
                self._out = (info, time.monotonic() - t0)
            except BaseException as exc:  # noqa: BLE001 - raised by result()
                self._error = exc
            finally:
                # A streamed write that failed midway: nothing will read the live state
                # again, so no step has anything to take (or wait) for it.
                snapshot.deferred.disarm()
                self._done.set()

        # A bare thread: threading.Thread.start() waits until the new thread runs, and
        # then for the GIL back, which a save blocks for (up to 10 ms on a busy
        # machine). Python does not join such a thread at exit: _finish_at_exit does,
        # at the same point (the save stays in _IN_FLIGHT until collected).
        # Streamed from the live tensors (and rolling: each copy freed once written) only
        # where the storage is done with each chunk before the next: see _DeferredCopy.
        releases = storage_base.releases_chunks(mgr.storage)
        snapshot.deferred.streamed = releases
        snapshot.deferred.rolling = rolling and releases
        snapshot.deferred.arm()
        try:
            _thread.start_new_thread(write, ())
        except BaseException:
            snapshot.deferred.disarm()
            raise

    def done(self) -> bool:
        return self._done.is_set()

    def finished(self) -> bool:
        return self._done.is_set()

    def settle(self) -> None:
        self._snapshot.deferred.hurry()

    def result(self) -> tuple[CheckpointInfo, float]:
        while not self._done.wait(0.2):  # woken often: see _ForkedWrite.result
            pass
        if self._error is not None:
            raise self._error
        assert self._out is not None
        return self._out


_ATOMS = (str, bytes, int, float, complex, type(None), torch.dtype, torch.device, torch.Size)
_ATOM_TYPES = frozenset(_ATOMS)


def _rebuilt_tree(value: Any, memo: dict[int, Any], *, copy_rest: bool = True) -> Any:
    """``value`` with its containers copied and each tensor in ``memo`` replaced by what
    it maps to; immutable leaves are kept, anything else deep-copied (``copy_rest``) or
    kept. Faster than ``copy.deepcopy`` of the whole tree (a save blocks for it). Any
    mapping becomes a dict, any list or tuple (a namedtuple) a plain one: the encoder
    reads them alike, so the files are the same (a torch.Size is a leaf: it is written
    as a size, not as a tuple)."""
    kind = type(value)  # the exact types first: a save blocks for this walk
    if kind is dict:
        return {k: _rebuilt_tree(v, memo, copy_rest=copy_rest) for k, v in value.items()}
    if kind in _ATOM_TYPES:
        return value
    if id(value) in memo and isinstance(value, torch.Tensor):
        return memo[id(value)]
    if kind is list:
        return [_rebuilt_tree(v, memo, copy_rest=copy_rest) for v in value]
    if isinstance(value, _ATOMS):
        return value
    if isinstance(value, Mapping):
        return {k: _rebuilt_tree(v, memo, copy_rest=copy_rest) for k, v in value.items()}
    if isinstance(value, list):
        return [_rebuilt_tree(v, memo, copy_rest=copy_rest) for v in value]
    if isinstance(value, tuple):
        return tuple(_rebuilt_tree(v, memo, copy_rest=copy_rest) for v in value)
    if not copy_rest:
        return value
    return copy.deepcopy(value)  # its own memo: a tensor inside it is copied, never live


def _plain(t: torch.Tensor) -> bool:
    """A dense tensor whose storage can be copied as bytes (others are deep-copied)."""
    return type(t) is torch.Tensor and t.layout == torch.strided and not t.is_quantized


_ALIGN = 64  # each storage's copy starts 64-aligned, as the CPU allocator aligns them
_CPU = torch.device("cpu")

StorageKey = tuple[torch.device, int, int]  # device, address, size


class _Tensors:
    """The tensors of a collected state and their storages, found in one walk (which
    both the choice of writer and the snapshot need; a save blocks for it, so it is a
    loop over a stack, not recursive generators: 1.6 -> 0.7 ms for 592 tensors)."""

    def __init__(self, collected: Mapping[str, Any]) -> None:
        self.tensors: list[tuple[torch.Tensor, StorageKey]] = []  # plain: copied by storage
        self.storages: dict[StorageKey, torch.UntypedStorage] = {}
        self.odd: list[torch.Tensor] = []  # sparse, quantized, meta...: deep-copied
        self.cpu_only = True
        self._cpu_bytes = 0
        tensors, storages, strided = self.tensors, self.storages, torch.strided
        stack: list[Any] = [collected]
        while stack:
            value = stack.pop()
            kind = type(value)
            if kind is dict:
                stack.extend(reversed(value.values()))  # in order: the walk is depth first
                continue
            if kind is not torch.Tensor:
                if isinstance(value, torch.Tensor):
                    self.odd.append(value)  # a subclass (Parameter...): deep-copied
                    if not value.is_cpu:
                        self.cpu_only = False
                elif isinstance(value, Mapping):
                    stack.extend(reversed(list(value.values())))
                elif isinstance(value, (list, tuple)):
                    stack.extend(reversed(value))
                continue
            t = value
            if t.is_cpu:
                device = _CPU
            else:
                device = t.device
                self.cpu_only = False
            if t.layout != strided or t.is_quantized or t.is_meta:
                self.odd.append(t)
                continue
            src = t.untyped_storage()
            key = (device, src.data_ptr(), src.nbytes())
            tensors.append((t, key))
            if key not in storages:
                storages[key] = src
                if device is _CPU:
                    self._cpu_bytes += key[2]

    def cpu_bytes(self) -> int:
        return self._cpu_bytes


class _Snapshot:
    """A copied state, as the thread writer gets it: the containers and odd values
    copied, the plain tensors still the live ones (they are replaced by views of their
    copies in ``tree()``, which the writer calls). ``deferred``: the part of the copy
    still to take (its ``run``), before the loop's next optimizer step."""

    def __init__(
        self,
        partial: Any,
        tensors: list[tuple[torch.Tensor, StorageKey]],
        copies: dict[StorageKey, tuple[torch.UntypedStorage, int]],
        deferred: _DeferredCopy | None = None,
    ) -> None:
        self._partial, self._tensors, self._copies = partial, tensors, copies
        self.deferred = deferred or _DeferredCopy([])  # nothing deferred: taken

    def tree(self) -> dict[str, Any]:
        views: dict[int, Any] = {}
        for t, key in self._tensors:
            if id(t) in views:
                continue
            dst, offset = self._copies[key]
            view = torch.empty(0, dtype=t.dtype)
            # offset is 64-aligned, so a whole number of elements of any dtype.
            view.set_(dst, offset // t.element_size() + t.storage_offset(), t.size(), t.stride())
            if t.requires_grad:  # as a sync save sees it
                view.requires_grad_(True)
            views[id(t)] = view
        return _rebuilt_tree(self._partial, views, copy_rest=False)


# -- the deferred copy -------------------------------------------------------------------
#
# Most of a training state is what its optimizers own: their parameters and their state
# (AdamW: 3 tensors a parameter). Those change only in ``optimizer.step()``, so they need
# not be copied inside ``save()``: the writer streams them from the live memory (or
# copies them first, on a storage that may keep a chunk), and the next step of any
# optimizer first takes what is left (a step pre-hook). The pipelined snapshot of
# CheckFreq (Mohan et al., FAST 2021), with the copy cut to what a step would change
# before it is written. Everything else (buffers, which a forward may update; tensors
# no optimizer owns; anything of an optimizer whose step runs no hooks) is copied
# before save() returns.
#
# A write to an owned tensor outside step() before it is copied or written (a restore, a
# manual update under no_grad) would tear the snapshot: ``restore`` takes the rest
# first, and every owned tensor's version counter is compared once its storage is copied
# or written, so such a write fails the save (raised by the next save/wait/close)
# instead of committing a mix. A write through ``.data`` bypasses version counters:
# ``async_snapshot="eager"`` copies everything inside save() for loops that do that
# (docs/RESUME.md, "Async save").

_IN_COPY: set[_DeferredCopy] = set()  # deferred copies not yet taken
_IN_COPY_LOCK = threading.Lock()
_HOOKED: weakref.WeakKeyDictionary[torch.optim.Optimizer, Any] = weakref.WeakKeyDictionary()


def _no_copies_in_child() -> None:
    # A forked child (a DataLoader worker) has no writer thread to take a copy it
    # inherited as pending: an optimizer step there must not wait for it forever. The
    # lock is new too: a parent thread may have held it at the fork.
    global _IN_COPY_LOCK
    _IN_COPY_LOCK = threading.Lock()
    _IN_COPY.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_no_copies_in_child)


class _Range:
    """One deferred storage: where its copy goes in the flat buffer (``start``..``end``,
    addresses), the live storage's address (``source``) and the storage itself
    (``live``: read straight from it until the loop's next step), the version of each
    tensor over it when save() ran, and how many file entries still have to stream it
    (``refs``). ``copied``: its copy
    is taken; ``done``: every entry over it was streamed from the live storage, so it
    never needs a copy."""

    __slots__ = ("start", "end", "source", "versions", "refs", "copied", "done", "live")

    def __init__(
        self,
        start: int,
        end: int,
        source: int,
        versions: list[Any],
        live: torch.UntypedStorage,
    ) -> None:
        self.start, self.end, self.source, self.versions = start, end, source, versions
        self.live = live
        self.refs = 0
        self.copied = self.done = False

    @property
    def pieces(self) -> list[tuple[int, int, int]]:
        """Its copy as (destination, source, length) memmoves: made only when it is
        copied (a streamed save mostly copies nothing, and save() blocks for this)."""
        return _pieces(self.start, self.source, self.end - self.start)

    def changed(self) -> int:
        """How many tensors over it were written since save() (their version counters)."""
        return sum(1 for t, version in self.versions if t._version != version)


# The most a live read holds at once: an optimizer step waits for at most one such read
# (a memcpy into the writer's bounce buffer, or one buffered write) before it goes on.
_LIVE_PIECE = 1 << 20


class _DeferredCopy:
    """The part of a snapshot taken after save() returned: what optimizers own.

    Three ways to take it.

    - **Streamed** (the default, on a storage that ``releases_chunks``: local disks):
      the writer streams each owned storage straight from the live tensors, in pieces of
      ``_LIVE_PIECE``, and copies nothing; the loop's next optimizer step (or a restore)
      copies, at memory speed, only what is not written yet, waits for the one piece
      the writer may be reading, and goes on; the writer then reads the rest from that
      copy. A save that is over before the next step copies nothing at all (96 MB here:
      100 -> 4 MB extra). Pages the copy touched are kept for the
      next save (a fresh page costs a fault, more than the copy).
    - **Rolling** (``async_snapshot="rolling"``, or streamed where a copy of the state
      would take more than half the memory left): streamed, and each copied storage is
      freed (``madvise(MADV_DONTNEED)``) once every file entry over it is written, so a
      save never holds more than the part a step copied and is not written yet.
    - **Whole** (any other storage: gs://, drive://, memory:// may hold a chunk after
      asking for the next): the writer copies every range first thing, then writes the
      copy, and the next step waits for that copy (~12 ms for 96 MB).

    Either way the live tensors are never read once the next step (``_before_step``) or
    a restore has called ``hurry``. Each storage's versions are compared right after its
    copy, or once it is streamed from the live tensors to its end, so a change made
    outside step() before then fails the save (raised before its manifest)."""

    def __init__(
        self,
        ranges: list[_Range],
        buffer: torch.Tensor | None = None,
        region: mmap.mmap | None = None,
    ) -> None:
        # The buffer the ranges point into (over ``region``, when it is a mapping), held:
        # a step may still be copying into it after its manager dropped (or outgrew) it.
        self._buffer = buffer
        self._closed = False
        self._ranges = ranges  # in address order (the flat buffer's layout)
        self._starts = [r.start for r in ranges]
        self._left = len(ranges)
        self._region = region
        self._base = buffer.data_ptr() if buffer is not None else 0
        # Reentrant: a copy that takes the last range disarms under it.
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)  # no live piece is being read
        self._reading = 0  # live pieces handed to the consumer and not given back yet
        self._changed = 0
        self.streamed = False  # set by the writer, before it is armed
        self.rolling = False
        self._taken = threading.Event()
        if not ranges:  # nothing to copy: taken already, and no step ever waits for it
            self._taken.set()

    @property
    def empty(self) -> bool:
        return not self._ranges

    def arm(self) -> None:
        """From now on every optimizer step takes (or waits for) this copy first: called
        once nothing can fail before the writer that takes it runs."""
        if not self._ranges:
            return
        with _IN_COPY_LOCK:
            _IN_COPY.add(self)

    def disarm(self) -> None:
        """Its write is over (or failed): nothing is copied or read live after this."""
        with self._lock:
            self._reading = 0  # its consumer is gone: it holds no live piece any more
            self._idle.notify_all()
        self._unlist()

    def _unlist(self) -> None:
        """Nothing is left to copy: no step needs to call ``hurry`` for it any more."""
        self._closed = True
        with _IN_COPY_LOCK:
            _IN_COPY.discard(self)
        self._taken.set()

    def run(self) -> None:
        """The writer's first call: takes the whole copy unless ``streamed``; raises
        (for that save) if a tensor changed before its copy."""
        if self.streamed:
            return
        try:
            self.take_rest()
        finally:
            self.disarm()  # even on failure: a step waiting for it must go on
        self.check()

    def take_rest(self) -> None:
        """Copy every range not copied yet and still to be written (the loop's next
        step, a restore, the writer)."""
        with self._lock:
            if not self._closed:
                todo = [r for r in self._ranges if not r.copied and not r.done]
                if todo:
                    self._copy(todo)

    def hurry(self) -> None:
        """Before the live state changes (an optimizer step, a restore). Streamed: copy
        what is not written yet here and now, and wait for the live piece the writer may
        be reading; otherwise wait for the writer, which is taking the whole copy."""
        if not self.streamed:
            while not self._taken.wait(0.2):  # woken often: Ctrl+C still interrupts
                pass
            return
        with self._lock:
            self.take_rest()
            while self._reading:
                self._idle.wait(0.2)

    def _copy(self, ranges: list[_Range]) -> None:
        pieces = [p for r in ranges for p in r.pieces]
        _copy_pieces(pieces, sum(n for _, _, n in pieces))
        for r in ranges:  # after the copy, before anything may write the live tensors
            self._changed += r.changed()
            r.copied = True
        self._gone(len(ranges))

    def _gone(self, n: int) -> None:
        """``n`` more ranges are copied or written: the live state is not needed for them."""
        self._left -= n
        if not self._left:
            # (A live piece may still be read: the hurry that took the last copy waits.)
            self._unlist()

    def check(self) -> None:
        """Raise if any tensor changed before its copy (the writer: before the manifest)."""
        self.take_rest()  # a range no entry streamed (there is none, but never commit less)
        if self._changed:
            raise ConfigError(
                f"{self._changed} tensor(s) of the state were changed in place after "
                "save() returned and before the async save had copied them (outside "
                "optimizer.step(): a restore or a manual update): that checkpoint was "
                "not committed; pass async_snapshot='eager' to copy every tensor "
                "inside save()"
            )

    # -- native.Watch: the encoder streams each tensor through it --------------------

    def _range_of(self, t: torch.Tensor) -> _Range | None:
        if not t.numel() or t.device.type != "cpu":
            return None
        address = t.data_ptr()
        i = bisect.bisect_right(self._starts, address) - 1
        if i < 0 or address >= self._ranges[i].end:
            return None  # copied inside save() (not owned), or not from this snapshot
        return self._ranges[i]

    def planned(self, t: torch.Tensor) -> None:
        r = self._range_of(t)
        if r is not None:
            r.refs += 1  # the files are planned before any is written: no lock needed

    def stream(self, t: torch.Tensor) -> Iterator[memoryview]:
        """``t``'s bytes (``t``: a view of this snapshot's copy): read from the live
        storage while the loop has not stepped, from the copy once it is taken."""
        r = self._range_of(t)
        if r is None:
            yield from native.tensor_chunks(t)
            return
        contiguous = t.is_contiguous()
        if not contiguous and t.numel() * t.element_size() > native.CHUNK:
            self.before(t)  # converted in many pieces (a large transposed view): the copy
            yield from native.tensor_chunks(t)
            self.after(t)
            return
        # The same view of the live storage.
        at = (t.data_ptr() - r.start) // t.element_size()
        live = torch.empty(0, dtype=t.dtype).set_(r.live, at, t.size(), t.stride())
        if not contiguous:  # converted at once (what tensor_chunks does too): a new tensor
            with self._reading_live(r) as from_live:
                data = native.bytes_of((live if from_live else t).contiguous())
            yield data
        else:
            copy, live_bytes = native.bytes_of(t), native.bytes_of(live)
            for lo in range(0, len(copy), _LIVE_PIECE):
                with self._reading_live(r) as from_live:
                    # Consumed before the consumer asks for the next piece (releases_chunks).
                    yield (live_bytes if from_live else copy)[lo : lo + _LIVE_PIECE]
        self.after(t)

    @contextlib.contextmanager
    def _reading_live(self, r: _Range) -> Iterator[bool]:
        """Whether ``r`` is to be read live (not copied yet); a step waits while it is."""
        with self._lock:
            from_live = not r.copied
            if from_live:
                self._reading += 1
        try:
            yield from_live
        finally:  # done with it (or abandoned: the write failed)
            if from_live:
                with self._lock:
                    self._reading = max(0, self._reading - 1)
                    self._idle.notify_all()

    def before(self, t: torch.Tensor) -> None:
        """Take ``t``'s storage now (it is read from the copy)."""
        r = self._range_of(t)
        if r is not None and not r.copied:
            with self._lock:
                if not r.copied and not self._closed:
                    self._copy([r])

    def after(self, t: torch.Tensor) -> None:
        """One entry over ``t``'s storage is written: once all are, a storage read live
        to its end has its versions compared, and a rolling copy is freed."""
        r = self._range_of(t)
        if r is None:
            return
        with self._lock:
            r.refs -= 1
            if r.refs:
                return
            if not r.copied and not r.done:  # streamed from the live tensors to its end
                self._changed += r.changed()
                r.done = True
                self._gone(1)
            if not r.copied or not self.rolling or self._region is None:
                return
            # The whole pages inside its copy (the ends share pages with its neighbours).
            lo = -(-(r.start - self._base) // mmap.PAGESIZE) * mmap.PAGESIZE
            hi = (r.end - self._base) // mmap.PAGESIZE * mmap.PAGESIZE
            if hi > lo:
                with contextlib.suppress(OSError, ValueError):
                    self._region.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _before_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    """An optimizer's step pre-hook: an owned tensor is not written before its copy."""
    if not _IN_COPY:  # the common case: one set lookup a step
        return
    with _IN_COPY_LOCK:
        waiting = list(_IN_COPY)
    for deferred in waiting:
        deferred.hurry()


def _optimizers(objects: Mapping[str, Any]) -> Iterator[torch.optim.Optimizer]:
    """The torch optimizers of a state, unwrapped (accelerate's and Lightning's wrappers
    hold the optimizer whose step runs, as ``optimizer`` / ``_optimizer``)."""
    found: set[int] = set()
    for value in objects.values():
        seen: set[int] = set()
        while value is not None and id(value) not in seen:
            seen.add(id(value))
            # accelerate's wrapper is an Optimizer whose own step runs no hooks: unwrap it
            if isinstance(value, torch.optim.Optimizer) and getattr(
                type(value).step, "hooked", False
            ):
                if id(value) not in found:  # a scheduler names its optimizer too
                    found.add(id(value))
                    yield value
                break
            value = _wrapped(value)


def _wrapped(value: Any) -> Any:
    for attr in ("optimizer", "_optimizer"):
        try:
            inner = getattr(value, attr, None)
        except Exception:  # noqa: BLE001 - a property that fails: not a wrapper
            continue
        if inner is not None:
            return inner
    return None


def _owned(objects: Mapping[str, Any]) -> set[int]:
    """The addresses of the CPU tensors that only an optimizer's step writes (its
    parameters and state), each optimizer given the hook that makes its next step wait
    for their copy. A state's tensor at one of these addresses shares that memory (a
    ``state_dict()`` detaches parameters into new tensor objects, so not by identity)."""
    owned: set[int] = set()
    tensor = torch.Tensor
    for opt in _optimizers(objects):
        if opt not in _HOOKED:
            _HOOKED[opt] = opt.register_step_pre_hook(_before_step)
        for group in opt.param_groups:
            owned.update(p.data_ptr() for p in group["params"] if p.is_cpu)
        for per_param in opt.state.values():
            owned.update(
                v.data_ptr() for v in per_param.values() if isinstance(v, tensor) and v.is_cpu
            )
    owned.discard(0)  # an empty tensor has no memory: it says nothing of the others
    return owned


class _HostBuffers:
    """Copies a collected state for the thread writer, tensors by storage (two views of
    one storage stay views of one copy, so the encoder sees the same sharing).

    CPU storages are copied into one flat buffer kept for the next save (one save in
    flight, so it is free again when the next snapshot starts): a fresh buffer costs a
    page fault per 4 KiB, several times the copy itself, so only a run's first snapshot
    (or one of a larger state) pays them. The buffer is a private anonymous mapping of
    its own, left out of every fork (``MADV_DONTFORK``): a DataLoader worker forked
    between two saves would otherwise leave each of its pages copy-on-write, and the
    next snapshot would fault on every page again. CUDA storages go to pinned host
    buffers, also kept, copied on a side stream."""

    def __init__(self) -> None:
        self._flat = torch.empty(0, dtype=torch.uint8)
        self._region: mmap.mmap | None = None  # the mapping under _flat, if it is one
        self._pinned: list[torch.Tensor] = []
        self._streams: dict[torch.device, Any] = {}

    def release(self) -> None:
        """Free the kept buffers (the manager closes, or the next save forks). A writer
        still using them keeps its views (and so the mapping) alive until it is done."""
        self._flat = torch.empty(0, dtype=torch.uint8)
        self._region = None
        self._pinned.clear()

    def snapshot(
        self, collected: dict[str, Any], found: _Tensors, owned: set[int] | None = None
    ) -> _Snapshot:
        """Copy ``found``'s storages now, except the CPU ones holding a tensor at an
        ``owned`` address (optimizers' parameters and state): their copy is deferred to
        the writer (``_Snapshot.complete``)."""
        storages = found.storages
        owned = owned or set()
        copies, deferred = self._copy_cpu(
            {k: s for k, s in storages.items() if k[0].type == "cpu"}, owned, found
        )
        used: list[Any] = []
        others = [(k, s) for k, s in storages.items() if k[0].type != "cpu"]
        for slot, (key, src) in enumerate(others):
            copies[key] = (self._copy_cuda(src, key[0], slot, used), 0)
        for stream in used:
            stream.synchronize()  # the copies are complete before save() returns
        # Everything else (lists, dicts, numbers, numpy arrays, odd tensors) is copied
        # now too: the loop may change a list it handed to the state after save() returns.
        # The copied tensors' views are made by the writer (_Snapshot.tree), off the
        # loop's time: a tensor's shape, strides and offset do not change under it.
        live = {id(t): t for t, _ in found.tensors}
        return _Snapshot(_rebuilt_tree(collected, live), found.tensors, copies, deferred)

    def _copy_cpu(
        self,
        storages: dict[StorageKey, torch.UntypedStorage],
        owned: set[int],
        found: _Tensors,
    ) -> tuple[dict[StorageKey, tuple[torch.UntypedStorage, int]], _DeferredCopy | None]:
        """Copy the CPU storages into the kept flat buffer, except those holding an
        ``owned`` tensor: their pieces are returned, to be copied later."""
        later_keys = {key for t, key in found.tensors if key in storages and t.data_ptr() in owned}
        total = 0
        offsets = {}
        for key in storages:
            offsets[key] = total
            total += -(-key[2] // _ALIGN) * _ALIGN
        if self._flat.numel() < total:
            self._flat = torch.empty(0, dtype=torch.uint8)  # freed before the larger one
            self._region = None
            self._flat, self._region = _unforked_buffer(total)
        flat = self._flat
        base = flat.data_ptr()
        now: list[tuple[int, int, int]] = []
        by_key: dict[StorageKey, _Range] = {}
        now_bytes = 0
        for key, offset in offsets.items():
            _, address, n = key
            if key in later_keys:
                by_key[key] = _Range(base + offset, base + offset + n, address, [], storages[key])
            else:
                now.extend(_pieces(base + offset, address, n))
                now_bytes += n
        deferred = None
        ranges = list(by_key.values())  # in address order, as the buffer is laid out
        if ranges:
            counted = True
            get = by_key.get
            try:  # one try for all (save() blocks for this loop): a failure is rare
                for t, key in found.tensors:
                    r = get(key)
                    if r is not None:
                        r.versions.append((t, t._version))
            except RuntimeError:  # an inference tensor keeps no version counter
                counted = False
            if not counted:  # such a tensor can change unseen: all of it is copied now
                now.extend(p for r in ranges for p in r.pieces)
                now_bytes += sum(r.end - r.start for r in ranges)
            else:
                deferred = _DeferredCopy(ranges, flat, self._region)
        _copy_pieces(now, now_bytes)
        storage = flat.untyped_storage()
        return {key: (storage, off) for key, off in offsets.items()}, deferred

    def _copy_cuda(
        self, src: torch.UntypedStorage, device: torch.device, slot: int, used: list[Any]
    ) -> torch.UntypedStorage:
        n = src.nbytes()
        source = torch.empty(0, dtype=torch.uint8, device=device).set_(src)
        while len(self._pinned) <= slot:
            self._pinned.append(torch.empty(0, dtype=torch.uint8))
        if self._pinned[slot].numel() != n:  # the storage's exact size: the encoder writes it
            self._pinned[slot] = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        buffer = self._pinned[slot]
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        # The side stream starts after the work queued so far (the step that produced
        # these tensors), then copies while the default stream goes on.
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            buffer.copy_(source, non_blocking=True)
        if stream not in used:
            used.append(stream)
        return buffer.untyped_storage()


_PIECE = 4 << 20  # the unit the two copying threads share out (balances big tensors)


def _pieces(destination: int, source: int, n: int) -> list[tuple[int, int, int]]:
    """A copy of ``n`` bytes as memmoves of at most ``_PIECE``."""
    return [(destination + o, source + o, min(_PIECE, n - o)) for o in range(0, n, _PIECE)]


_PARALLEL_MIN = 8 << 20  # below this, a second thread costs more than it saves


# The mappings behind _unforked_buffer, while alive. A forked child does not have them
# (MADV_DONTFORK), yet it inherits the Python objects that would munmap them when freed:
# by then the child may have mapped something else at those addresses. So a child keeps
# every inherited one alive for good (see _keep_in_child).
_UNFORKED: weakref.WeakSet[mmap.mmap] = weakref.WeakSet()
_KEPT_IN_CHILD: list[mmap.mmap] = []


def _keep_in_child() -> None:
    _KEPT_IN_CHILD.extend(_UNFORKED)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_keep_in_child)


def _unforked_buffer(nbytes: int) -> tuple[torch.Tensor, mmap.mmap | None]:
    """A zeroed, page-aligned uint8 tensor over a private anonymous mapping that forks
    leave out (where the platform can say so), and that mapping (None: plain memory)."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8), None
    try:
        region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (AttributeError, OSError, ValueError):  # no anonymous mmap here: plain memory
        return torch.empty(nbytes, dtype=torch.uint8), None
    with contextlib.suppress(AttributeError, OSError, ValueError):
        region.madvise(mmap.MADV_DONTFORK)
        _UNFORKED.add(region)
    # The tensor holds the mapping (a buffer export) until its last view is gone. (Huge
    # pages were tried: the first snapshot then stalled on compaction, 74 -> 223 ms.)
    return torch.frombuffer(region, dtype=torch.uint8), region


def _copy_pieces(pieces: list[tuple[int, int, int]], total: int) -> None:
    """memmove each (destination, source, length); on a machine with a second core, two
    threads share the pieces out (each memmove releases the GIL: 96 MB took 12 ms on one
    thread, 9.5 ms on two, memory bandwidth being the limit). Both take the next piece
    from one iterator, so a helper that is slow to start, or descheduled on a busy
    machine, only does less of the work: the copy never waits for it beyond one piece."""
    work = iter(pieces)

    def copy_all() -> None:
        for dst, src, n in work:
            # A plain memcpy (ctypes releases the GIL meanwhile), not torch's copy_: that
            # runs a parallel region per tensor, and on a busy machine each waits for a
            # descheduled worker (seconds for 592 tensors).
            ctypes.memmove(dst, src, n)

    if total < _PARALLEL_MIN or _cores() < 2:
        copy_all()
        return
    helper_done = _thread.allocate_lock()
    helper_done.acquire()
    failed: list[BaseException] = []

    def helper() -> None:
        try:
            copy_all()
        except BaseException as exc:  # noqa: BLE001 - raised by the snapshot, below
            failed.append(exc)
        finally:
            helper_done.release()

    # A bare thread (as for the writer): Thread.start() would wait for it to run.
    _thread.start_new_thread(helper, ())
    try:
        copy_all()
    finally:
        # Even when interrupted (Ctrl+C): the helper may still be writing into the
        # buffer, which must not be reused or freed before its last piece is done.
        interrupted: BaseException | None = None
        while True:
            try:
                if helper_done.acquire(timeout=1.0):
                    break
            except BaseException as exc:  # noqa: BLE001 - a second Ctrl+C: still wait
                interrupted = exc
        if interrupted is not None:
            raise interrupted
    if failed:  # a piece it took is not copied: the snapshot is not whole
        raise failed[0]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# -- the fork writer -----------------------------------------------------------------


# Fork when the state is at least this share of the process's resident memory. A fork
# costs in proportion to the whole process (it copies the page tables of every resident
# page, and the child shares, so the PSS counts half of, all of them); a copy costs in
# proportion to the state. Measured on 2 cores (bench/results/save.md, memory.md): a
# 96 MB GPT-2 + AdamW state in a 375 MB process forks in ~20 ms, and its child's PSS is
# 188 MB; the copy takes ~12 ms and 96 MB. At 503 MB of a 761 MB process, the fork takes
# ~40 ms and its child 382 MB, the copy ~65 ms and 503 MB. Both cross near one half.
_FORK_MIN_SHARE = 0.5


def _available_memory() -> int | None:
    """Bytes this process may still take: MemAvailable, or less under a cgroup (v2)
    limit (a container, a SLURM job); None where neither can be read."""
    found: list[int] = []
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo", "rb") as f:
        for line in f:
            if line.startswith(b"MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
                break
    with contextlib.suppress(OSError, ValueError):
        with open("/sys/fs/cgroup/memory.max", "rb") as f:
            limit = f.read().strip()
        if limit != b"max":
            with open("/sys/fs/cgroup/memory.current", "rb") as f:
                found.append(max(0, int(limit) - int(f.read())))
    return min(found) if found else None


def _memory_tight(nbytes: int) -> bool:
    """A copy of ``nbytes`` would take more than half of the memory left."""
    available = _available_memory()
    return available is not None and 2 * nbytes > available


def _can_fork(mgr: CheckpointManager, found: _Tensors) -> bool:
    storage = mgr.storage
    if not sys.platform.startswith("linux") or _prctl() is None:
        return False  # no PR_SET_PDEATHSIG: a child could outlive its parent
    if threading.current_thread() is not threading.main_thread():
        return False  # PDEATHSIG follows the forking thread, which may end first
    if getattr(storage, "write_behind", False) or storage.local_path("") is None:
        return False
    if not found.cpu_only or found.cpu_bytes() < _FORK_MIN_SHARE * _resident_bytes():
        return False  # checked first: it is cheap, and decides for small states
    pinned_matters = torch.cuda.is_initialized()
    # One tensor per storage is enough: sharing and pinning are the storage's.
    firsts = {key: t for t, key in reversed(found.tensors)}
    return all(_copy_on_write(t, pinned_matters) for t in [*firsts.values(), *found.odd])


def _resident_bytes() -> int:
    """This process's resident memory (what a forked child would share)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _copy_on_write(t: torch.Tensor, pinned_matters: bool) -> bool:
    """Whether a forked child sees ``t`` as it is now, whatever the parent does next:
    private CPU memory only. Shared memory (``share_memory_()``, ``from_file``) would show
    the parent's later writes; CUDA's pinned host memory is not mapped in a child."""
    try:
        if t.device.type != "cpu" or t.is_shared():
            return False
        return not (pinned_matters and t.is_pinned())
    except (RuntimeError, NotImplementedError):  # a layout that cannot say: copy it
        return False


_libc_prctl: Any = None


def _prctl() -> Any:
    """libc's prctl, looked up in the parent (never dlopen in a forked child)."""
    global _libc_prctl
    if _libc_prctl is None:
        try:
            _libc_prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            _libc_prctl = False
    return _libc_prctl or None


class _ForkedWrite(_Job):
    def __init__(
        self, mgr: CheckpointManager, collected: dict[str, Any], manifest: Manifest, name: str
    ) -> None:
        self.mgr, self.name, self.step = mgr, name, manifest.step
        prctl = _prctl()
        parent = os.getpid()
        for stream in (sys.stdout, sys.stderr):  # else the child's buffers repeat them
            with contextlib.suppress(Exception):
                stream.flush()
        r, w = os.pipe()
        try:
            with warnings.catch_warnings():
                # Python 3.12 warns about forking a threaded process: the child uses none
                # of the other threads' locks (no logging handlers of theirs, no uploads).
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
        except BaseException:
            os.close(r)
            os.close(w)
            raise
        if pid == 0:
            _child(mgr, collected, manifest, name, parent, w, prctl)
        os.close(w)
        self.pid, self._r = pid, r
        self._report = b""
        self._status: int | None = None

    def done(self) -> bool:
        if self._status is not None:
            return True
        # The pipe turns readable with the report, or at EOF when the child is gone.
        ready, _, _ = select.select([self._r], [], [], 0)
        return bool(ready)

    def finished(self) -> bool:
        return self._status is not None

    def cancel(self) -> None:
        if self._status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self._status = self._reap()
            os.close(self._r)

    def result(self) -> tuple[CheckpointInfo, float]:
        if self._status is None:
            # An interrupt (Ctrl+C) here leaves the job as it was: a later call goes on.
            # The wait wakes up every 0.2 s: a signal that another thread took (the
            # kernel may hand a process-wide one to any thread) interrupts no read of
            # this one, and Python runs its handler only when this thread runs.
            while True:
                ready, _, _ = select.select([self._r], [], [], 0.2)
                if not ready:
                    continue
                chunk = os.read(self._r, 65536)
                if not chunk:
                    break
                self._report += chunk
            self._status = self._reap()
            os.close(self._r)
        return self._outcome()

    def _reap(self) -> int:
        while True:
            try:
                return os.waitpid(self.pid, 0)[1]
            except InterruptedError:
                continue
            except ChildProcessError:  # SIGCHLD ignored: the kernel reaped it already
                return 0

    def _outcome(self) -> tuple[CheckpointInfo, float]:
        report: Any = None
        with contextlib.suppress(Exception):  # JSON, never a pickle: nothing is unpickled
            report = json.loads(self._report) if self._report else None
        if isinstance(report, list) and report[:1] == ["ok"]:
            return self._committed(), float(report[1])
        if isinstance(report, list) and report[:1] == ["error"]:
            raise _rebuilt(str(report[1]), str(report[2]))
        # No report: the child died (killed, out of memory) or its parent looked dead.
        # It may have died after its commit: then the checkpoint is there and complete.
        with contextlib.suppress(CkptError, OSError):
            return self._committed(), 0.0
        raise CkptError(
            f"{self.mgr.storage.url_of(self.name)}: the background writer (pid {self.pid}) "
            f"of step {self.step} died ({_describe(self._status or 0)}) before committing: "
            "the previous checkpoint is still the latest; save again (or use "
            "async_save=False if it keeps dying, e.g. out of memory)"
        )

    def _committed(self) -> CheckpointInfo:
        storage = self.mgr.storage
        storage.invalidate()
        manifest = runmod.read_manifest(storage, self.name)
        return CheckpointInfo(name=self.name, url=storage.url_of(self.name), manifest=manifest)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(sig).name}"
        return f"killed by signal {sig}"
    return f"exit status {os.WEXITSTATUS(status) if os.WIFEXITED(status) else status}"


def _child(
    mgr: CheckpointManager,
    collected: dict[str, Any],
    manifest: Manifest,
    name: str,
    parent: int,
    w: int,
    prctl: Any,
) -> NoReturn:
    """The forked writer's whole life: never returns, never runs atexit handlers."""
    status = 0
    try:
        # Die with the parent; if it died already (before prctl), stop here.
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(_ORPHANED)
        for sig_name in _STOP_SIGNALS:
            with contextlib.suppress(AttributeError, OSError, ValueError):
                signal.signal(getattr(signal, sig_name), signal.SIG_IGN)
        gc.disable()  # no finalizers of the parent's objects (clients, threads) run here
        torch.set_num_threads(1)  # the parent's intra-op pool does not exist here
        mgr.storage = _ParentGuard(mgr.storage, parent)  # this process's copy only
        t0 = time.monotonic()
        try:
            mgr._write(collected, manifest, name=name)
            report = json.dumps(["ok", time.monotonic() - t0]).encode()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            report = _error_report(exc)
        os.write(w, report)
    except BaseException:  # noqa: BLE001 - no report: the parent names the exit status
        status = 1
    finally:
        os._exit(status)


def _error_report(exc: BaseException) -> bytes:
    """The child's error as JSON (type name, message): the parent rebuilds it by name from
    ckptkit's error family or a few builtins, so nothing from the child is unpickled."""
    message = str(exc)[: _MAX_REPORT // 2]
    return json.dumps(["error", type(exc).__name__, message]).encode()


def _rebuilt(name: str, message: str) -> BaseException:
    import ckptkit.errors as errors

    known: dict[str, type[BaseException]] = {
        c.__name__: c
        for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, errors.CkptError)
    }
    for c in (OSError, RuntimeError, ValueError, TypeError, MemoryError, KeyError):
        known.setdefault(c.__name__, c)
    cls = known.get(name)
    if cls is None:
        return CkptError(f"{name}: {message}")
    try:
        return cls(message)
    except Exception:  # noqa: BLE001 - a class that wants other arguments
        return CkptError(f"{name}: {message}")


class _ParentGuard:
    """The child's view of the storage: before the call that commits (the rename of the
    temporary directory, or the manifest written last) it checks that its parent still
    runs, so a writer orphaned between PDEATHSIG's setup and now never commits."""

    def __init__(self, inner: Any, parent: int) -> None:
        self._inner, self._parent = inner, parent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _check(self) -> None:
        if os.getppid() != self._parent:
            os._exit(_ORPHANED)

    def rename(self, src: str, dst: str) -> None:
        self._check()
        self._inner.rename(src, dst)

    def write_bytes(self, key: str, data: bytes) -> None:
        if key.rsplit("/", 1)[-1] == MANIFEST:
            self._check()
        self._inner.write_bytes(key, data)


def _add_note(exc: BaseException, note: str) -> None:
    add = getattr(exc, "add_note", None)  # Python 3.11+
    if add is not None:
        add(note)
