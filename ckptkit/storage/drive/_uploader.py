"""The ordered write-behind queue of a run, the thread that drains it, and the one
queue per run and process."""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

from ckptkit.errors import StorageError
from ckptkit.storage import drive as _package  # the progress of a copy: _package.progress
from ckptkit.storage.drive._answer import hung_message, limit
from ckptkit.storage.drive._journal import Op, Session, replay
from ckptkit.storage.drive._mount import DriveFolder, Mount, MountLost


def covers(parent: str, key: str) -> bool:
    """Whether removing ``parent`` removes ``key``."""
    return parent == "" or key == parent or key.startswith(parent + "/")


# -- the queue --------------------------------------------------------------------
class Uploader:
    """The ordered write-behind queue of one run and the thread that drains it. Only a
    writer starts one: it adopts (and so replays) the staging of dead processes."""

    def __init__(
        self,
        url: str,
        root: str,
        target: str,
        run_staging: str,
        *,
        attempts: int,
        backoff: float,
    ) -> None:
        self.url = url
        self.run_staging = run_staging
        self.mount = Mount(root, run_staging)
        self.drive = DriveFolder(self.mount, target)
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.direct: set[str] = set()
        self._queue: deque[Op] = deque()
        self._cond = threading.Condition()
        self._error: StorageError | None = None
        self._busy = False  # the worker holds an operation (until its staging is cleaned)
        # When the worker last moved: took an operation, or copied / read back a block of
        # one. A worker that does not move for limit() seconds hangs on the mount.
        self._moved = time.monotonic()
        self._stopping = False
        self._seq = 0
        self.refs = 0
        os.makedirs(run_staging, exist_ok=True)
        try:
            self.mount.establish()  # before adopting: replay only onto the real Drive
        except MountLost as exc:
            raise self.lost(exc) from None
        self._session = Session.create(run_staging)
        self._adopt(run_staging)
        self._thread = threading.Thread(target=self._run, name="ckptkit-drive-upload", daemon=True)
        self._thread.start()

    def lost(self, why: BaseException | str) -> StorageError:
        """The one-line error for a root that is not the live mount."""
        return self.mount.lost(self.url, why)

    def check_mount(self) -> None:
        """Raise the mount error unless the root is the live mount."""
        if problem := self.mount.problem():
            raise self.lost(problem)

    # -- recovery -----------------------------------------------------------------
    def _adopt(self, run_staging: str) -> None:
        """Queue the unfinished operations of dead sessions of this run, oldest first."""
        for name in sorted(os.listdir(run_staging)):
            path = os.path.join(run_staging, name)
            if path == self._session.path or not os.path.isdir(path):
                continue
            session = Session.adopt(path)
            if session is None:
                continue  # its process is alive: it uploads its own files
            ops = replay(session)
            session.remaining = len(ops)
            self._queue.extend(ops)
            if not ops:
                session.release(remove=True)

    # -- submitting ---------------------------------------------------------------
    def _refuse(self) -> None:
        """Refuse new work when closed or when Drive is not mounted (a save fails now,
        rather than queueing a checkpoint that cannot reach Drive)."""
        if self._stopping:
            raise StorageError(f"{self.url}: the Drive storage is closed")
        self.check_mount()

    def _submit(self, op: Op) -> None:
        with self._cond:
            if self._stopping:
                raise StorageError(f"{self.url}: the Drive storage is closed")
            op.session.record(op.entry())
            op.session.remaining += 1
            self._queue.append(op)
            self._error = None  # a new write also retries a stuck upload
            self._cond.notify_all()

    def _next_seq(self) -> int:
        with self._cond:
            self._seq += 1
            return self._seq

    def put(self, key: str, data: bytes | Iterable[memoryview]) -> None:
        """Stage ``data`` (bytes, or chunks written as they come: a checkpoint's tensor
        file is never held whole in memory) and queue its upload."""
        self._refuse()
        seq = self._next_seq()
        staged = os.path.join(self._session.files, str(seq))
        size = 0
        try:
            with open(staged, "wb") as f:
                for chunk in (data,) if isinstance(data, bytes | bytearray | memoryview) else data:
                    size += f.write(chunk)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(staged)
            raise StorageError(
                f"{staged}: cannot stage a Drive write: {exc.strerror or exc}"
            ) from exc
        self._submit(Op("put", key, self._session, seq, staged=staged, size=size))

    def delete(self, key: str, recursive: bool) -> None:
        self._refuse()
        self._submit(Op("delete", key, self._session, self._next_seq(), recursive=recursive))

    def mkdir(self, key: str) -> None:
        self._refuse()
        self._submit(Op("mkdir", key, self._session, self._next_seq()))

    def pending(self) -> list[Op]:
        with self._cond:
            return list(self._queue)

    # -- the worker ---------------------------------------------------------------
    def _moving(self) -> None:
        self._moved = time.monotonic()

    def _run(self) -> None:
        _package.progress.tick = self._moving  # this thread's copies report each block
        while True:
            with self._cond:
                while not self._stopping and (not self._queue or self._error is not None):
                    self._cond.wait()
                if self._stopping and (not self._queue or self._error is not None):
                    break
                op = self._queue[0]
                self._busy = True
                self._moved = time.monotonic()
            failure = self._attempt(op)
            if failure is not None:
                with self._cond:
                    self._error = failure
                    self._busy = False
                    self._cond.notify_all()
                continue
            with self._cond:
                self._queue.popleft()  # from now on readers go to Drive, which is verified
            self._done(op)
            with self._cond:
                self._busy = False
                self._cond.notify_all()
        self._shutdown()

    def _attempt(self, op: Op) -> StorageError | None:
        """Apply ``op`` with up to ``attempts`` tries and a doubling backoff (cut short
        by ``stop()``); the error to report when every try failed, else None."""
        exc: Exception | None = None
        for i in range(self.attempts):
            try:
                self._apply(op)
                return None
            except OSError as err:  # Drive I/O, a bad copy, or the mount went away
                exc = err
            except Exception as err:  # not transient: do not retry
                exc = err
                break
            with self._cond:
                if self._stopping or i == self.attempts - 1:
                    break
                delay = min(30.0, self.backoff * 2**i) * random.uniform(0.5, 1.0)
                self._cond.wait(delay)
        if problem := self.mount.problem():
            return self.lost(problem)
        return StorageError(
            f"{self.url}/{op.key}: could not {op.kind} on Drive after {self.attempts} "
            f"attempts ({type(exc).__name__}: {exc}); the staged copy is kept in "
            f"{op.session.path}"
        )

    def _apply(self, op: Op) -> None:
        if op.kind == "put":
            self.drive.upload(op.staged, op.key, op.size)
        elif op.kind == "delete":
            self.drive.delete(op.key, recursive=op.recursive)
        elif op.kind == "mkdir":
            self.drive.mkdir(op.key)

    def _done(self, op: Op) -> None:
        op.session.record({"done": op.seq})
        if op.staged:
            with contextlib.suppress(OSError):
                os.unlink(op.staged)
        with self._cond:
            op.session.remaining -= 1
            finished = op.session is not self._session and op.session.remaining == 0
        if finished:
            op.session.release(remove=True)  # an adopted session, now fully uploaded

    def _shutdown(self) -> None:
        with self._cond:
            left = list(self._queue)
        for session in {op.session for op in left} - {self._session}:
            session.release(remove=False)
        self._session.release(remove=not any(op.session is self._session for op in left))

    # -- waiting ------------------------------------------------------------------
    def wait(self, until: Callable[[], bool] = lambda: False) -> None:
        """Block until the queue is empty (or ``until()`` holds); raise the error of a
        failed upload round, or at once the mount error while Drive is not mounted.
        Waiting also retries an upload that failed before."""
        with self._cond:
            self._error = None
            self._cond.notify_all()
        while True:
            with self._cond:
                if not (self._queue or self._busy) or until():
                    return
                if self._error is not None:
                    raise self._error
                if not self._thread.is_alive():
                    raise StorageError(f"{self.url}: the Drive upload thread has stopped")
                still = time.monotonic() - self._moved
                if self._busy and still >= limit():  # stuck in a call on a hung mount
                    raise self.lost(hung_message(still))
            self.check_mount()  # outside the lock: a slow mount must not stall the worker
            with self._cond:
                if (self._queue or self._busy) and self._error is None and not until():
                    self._cond.wait(0.5)

    def touches(self, key: str) -> bool:
        """Whether a queued operation writes, removes or lies under ``key``."""
        with self._cond:
            return any(covers(op.key, key) or covers(key, op.key) for op in self._queue)

    def stop(self) -> None:
        """Flush, then stop the thread (also when the flush fails; staging is kept)."""
        try:
            self.wait()
        except StorageError as exc:
            with self._cond:
                self._error = self._error or exc  # the worker stops after its current try
            raise
        finally:
            with self._cond:
                self._stopping = True
                self._cond.notify_all()
            # A worker stuck in a system call on a dead mount is left behind (a daemon
            # thread); its staged files stay for the next writer.
            self._thread.join(timeout=None if self._error is None else min(60.0, limit()))


# -- one uploader per run and process ---------------------------------------------
_UPLOADERS: dict[tuple[str, str], Uploader] = {}
_REGISTRY_LOCK = threading.Lock()


def _registry_key(target: str, run_staging: str) -> tuple[str, str]:
    return (os.path.realpath(target), os.path.realpath(run_staging))


def acquire(
    url: str, root: str, target: str, run_staging: str, attempts: int, backoff: float
) -> Uploader:
    key = _registry_key(target, run_staging)
    with _REGISTRY_LOCK:
        up = _UPLOADERS.get(key)
        if up is None:
            up = Uploader(url, root, target, run_staging, attempts=attempts, backoff=backoff)
            _UPLOADERS[key] = up
        up.refs += 1
        return up


def running(target: str, run_staging: str) -> Uploader | None:
    """This process's queue for the run, when a writer started one."""
    with _REGISTRY_LOCK:
        return _UPLOADERS.get(_registry_key(target, run_staging))


def release(up: Uploader) -> None:
    with _REGISTRY_LOCK:
        up.refs -= 1
        if up.refs > 0:
            return
        for key, value in list(_UPLOADERS.items()):
            if value is up:
                del _UPLOADERS[key]
    up.stop()


@atexit.register
def _flush_all_at_exit() -> None:
    for up in list(_UPLOADERS.values()):
        up.refs = 1
        try:
            release(up)
        except Exception as exc:  # the staged files stay for the next process
            print(f"ckptkit: Drive uploads left staged: {exc}", file=sys.stderr, flush=True)
