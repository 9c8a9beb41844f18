"""Async save: ``save()`` returns once a consistent snapshot of the state is taken; the
encode, checksums and commit (``CheckpointManager._write``) run in the background, and
the manager finishes the save (hooks, retention) when it collects the result.

Two writers, chosen per save (docs/RESUME.md, "Async save"):

- **fork** (Linux, a local filesystem, every tensor on the CPU, called from the main
  thread): the parent forks right after ``collect_state``; the child's copy-on-write view
  of memory *is* the snapshot, so ``save()`` blocks only for the fork. The child writes and
  commits, reports over a pipe and ``os._exit``\\ s. It dies with its parent
  (``PR_SET_PDEATHSIG``) and checks that its parent lives before the commit itself, so a
  killed run never has a second writer; it touches none of the parent's threads (lock
  heartbeat, uploaders, event loops) and runs no atexit handler.
- **thread** (everything else: gs://, memory://, drive://, CUDA tensors): ``save()``
  copies every tensor (CUDA: device to host into reusable pinned buffers on a side
  stream, synchronized before it returns; CPU: a copy), then a thread writes the copy.
  This path blocks for the copy.

At most one save is in flight: the next ``save`` first waits for the previous one. A
background error is raised by the next ``save``/``wait``/``close`` (and printed at
interpreter exit when the manager was never closed), never dropped.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import ctypes
import gc
import json
import os
import select
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from ckptkit import run as runmod
from ckptkit.errors import CkptError
from ckptkit.manifest import MANIFEST
from ckptkit.run import CheckpointInfo

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


class AsyncSaver:
    """The manager's background writer: one save in flight at a time."""

    def __init__(self, manager: CheckpointManager) -> None:
        self.manager = manager
        self._pending: _Pending | None = None
        self._buffers = _HostBuffers()

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def submit(
        self,
        collected: dict[str, Any],
        manifest: Manifest,
        existing: list[CheckpointInfo],
        started: float,
    ) -> CheckpointInfo:
        """Start writing ``collected``; return the CheckpointInfo it will be committed as
        (its manifest has no file entries yet). The caller waited for any previous save."""
        mgr = self.manager
        name = mgr._next_name(manifest.step)
        info = CheckpointInfo(name=name, url=mgr.storage.url_of(name), manifest=manifest)
        if _can_fork(mgr, collected):
            try:
                job: _Job = _ForkedWrite(mgr, collected, manifest, name)
            except OSError:  # no memory to fork a large process (strict overcommit)
                job = self._threaded(collected, manifest, name)
        else:
            job = self._threaded(collected, manifest, name)
        now = time.monotonic()
        # Told now, not when the result is collected: an interval trigger must not fire
        # again at the next step only because the write is still running.
        for trigger in mgr.triggers:
            trigger.saved(manifest.step, now)
        self._pending = _Pending(job, info, existing, blocked=now - started)
        _IN_FLIGHT[id(self)] = self  # held until finished: never dropped with its manager
        return info

    def _threaded(self, collected: dict[str, Any], manifest: Manifest, name: str) -> _Job:
        snapshot = self._buffers.snapshot(collected)
        return _ThreadWrite(self.manager, snapshot, manifest, name)

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
        """Stop waiting for the save in flight (``close()`` interrupted, say by a second
        Ctrl+C): a forked writer is killed, since the run lock is about to be released
        and no writer may outlive it; its half-written checkpoint stays invisible."""
        pending = self._pending
        if pending is not None:
            self._forget()
            pending.job.cancel()

    def _forget(self) -> None:
        self._pending = None
        _IN_FLIGHT.pop(id(self), None)


# Every saver with a save in flight, finished at interpreter exit (a manager never closed,
# or one whose close() was interrupted): its checkpoint is committed, or its error said.
_IN_FLIGHT: dict[int, AsyncSaver] = {}


@atexit.register
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

    def result(self) -> tuple[CheckpointInfo, float]:
        """The committed checkpoint and the seconds the write took; raises its error."""
        raise NotImplementedError


# -- the thread writer ---------------------------------------------------------------


class _ThreadWrite(_Job):
    def __init__(
        self, mgr: CheckpointManager, snapshot: dict[str, Any], manifest: Manifest, name: str
    ) -> None:
        self._out: tuple[CheckpointInfo, float] | None = None
        self._error: BaseException | None = None

        def write() -> None:
            t0 = time.monotonic()
            try:
                info = mgr._write(snapshot, manifest, name=name)
                self._out = (info, time.monotonic() - t0)
            except BaseException as exc:  # noqa: BLE001 - raised by result()
                self._error = exc

        # Not a daemon: a write under way is finished before the interpreter exits.
        self._thread = threading.Thread(target=write, name="ckptkit-async-save")
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def finished(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> tuple[CheckpointInfo, float]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._out is not None
        return self._out


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _plain(t: torch.Tensor) -> bool:
    """A dense tensor whose storage can be copied as bytes (others are deep-copied)."""
    return type(t) is torch.Tensor and t.layout == torch.strided and not t.is_quantized


class _HostBuffers:
    """Copies a collected state for the thread writer, tensors by storage (two views of
    one storage stay views of one copy, so the encoder sees the same sharing). CUDA
    storages go to pinned host buffers kept for the next save (one save in flight, so a
    buffer is free again when the next snapshot starts)."""

    def __init__(self) -> None:
        self._pinned: list[torch.Tensor] = []
        self._streams: dict[torch.device, Any] = {}

    def snapshot(self, collected: dict[str, Any]) -> dict[str, Any]:
        memo: dict[int, Any] = {}
        copies: dict[tuple[str, int, int], torch.UntypedStorage] = {}
        used: list[Any] = []
        slot = 0
        for t in _tensors(collected):
            if id(t) in memo or not _plain(t) or t.device.type == "meta":
                continue
            src = t.untyped_storage()
            key = (str(t.device), src.data_ptr(), src.nbytes())
            dst = copies.get(key)
            if dst is None:
                dst = copies[key] = self._copy(src, t.device, slot, used)
                slot += 1
            view = torch.empty(0, dtype=t.dtype)
            view.set_(dst, t.storage_offset(), t.size(), t.stride())
            if t.requires_grad:  # pickled with the tensor: the encoded bytes must match
                view.requires_grad_(True)
            memo[id(t)] = view
        for stream in used:
            stream.synchronize()  # the copies are complete before save() returns
        # Everything else (lists, dicts, numbers, numpy arrays, odd tensors) is copied too:
        # the loop may change a list it handed to the state after save() returns.
        return copy.deepcopy(collected, memo)

    def _copy(
        self, src: torch.UntypedStorage, device: torch.device, slot: int, used: list[Any]
    ) -> torch.UntypedStorage:
        n = src.nbytes()
        source = torch.empty(0, dtype=torch.uint8, device=device).set_(src)
        if device.type != "cuda":
            return source.clone().untyped_storage()
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


# -- the fork writer -----------------------------------------------------------------


def _can_fork(mgr: CheckpointManager, collected: Mapping[str, Any]) -> bool:
    storage = mgr.storage
    if not sys.platform.startswith("linux") or _prctl() is None:
        return False  # no PR_SET_PDEATHSIG: a child could outlive its parent
    if threading.current_thread() is not threading.main_thread():
        return False  # PDEATHSIG follows the forking thread, which may end first
    if getattr(storage, "write_behind", False) or storage.local_path("") is None:
        return False
    return all(_copy_on_write(t) for t in _tensors(collected))


def _copy_on_write(t: torch.Tensor) -> bool:
    """Whether a forked child sees ``t`` as it is now, whatever the parent does next:
    private CPU memory only. Shared memory (``share_memory_()``, ``from_file``) would show
    the parent's later writes; CUDA's pinned host memory is not mapped in a child."""
    if t.device.type != "cpu" or t.is_shared():
        return False
    return not (torch.cuda.is_initialized() and t.is_pinned())


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
            while chunk := os.read(self._r, 65536):
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
