"""Google Drive, FUSE-mounted in Colab, as ckptkit storage: ``drive://Folder/runs/exp1``.

Drive is slow, sometimes flaky, may lose the last write when the runtime disconnects,
and has no reliable atomic rename, so ``commit = "marker"`` and every write goes
through an ordered write-behind queue:

1. ``write_bytes`` stages the data on fast local disk and returns (training goes on);
2. one background thread copies staged files to Drive *in the order they were
   written*, re-reads each copy from Drive (size + sha256) and retries with backoff
   until it matches; only then is the staged copy removed. The manifest, written last
   by the commit strategy, therefore reaches Drive after the checkpoint's other files;
3. deletes (rotation) are queued in the same order, so an old checkpoint is never
   removed from Drive before the new one is committed there.

Reads, ``exists``, ``size`` and ``listdir`` merge what is still queued with what is
on Drive, so the process sees its own writes at once. ``flush()`` blocks until the
queue is drained and raises :class:`~ckptkit.errors.StorageError` when a file could
not be copied after the retries (the staged copy is kept; the next ``flush()`` or
write tries again). ``close()`` flushes and stops the thread.

Keys written with ``create_exclusive`` (the run lock) bypass the queue: they are
written to Drive synchronously, then and afterwards, so that the lock and its
heartbeat are not held up behind a large upload.

Staging lives in ``$CKPTKIT_DRIVE_STAGING`` (default ``~/.cache/ckptkit/drive-staging``),
one folder per run and, inside it, one *session* folder per process holding the
staged files, an append-only journal of queued operations and a ``flock``-ed lock
file. A new process for the same run adopts the sessions of processes that died
(e.g. a Colab runtime restart) and replays their unfinished operations first, in
their journal order. A lost staged file poisons the later writes into the same
folder, so a leftover manifest is never uploaded without all the files before it.
Staged files are not fsynced: a kernel crash keeps the page cache, and a lost VM
loses the local disk anyway.

**A vanished mount is an error.** An unmount (Colab's, or a dropped FUSE connection)
leaves the root missing or an empty folder in its place; writing there would put the
run on local disk while the real Drive stays at an older step. So the root itself is
never created (only folders below it), and it counts as the live mount only while it
holds the marker file ``.ckptkit-drive-root`` with the token this run's staging
recorded when the root was first seen (and, under ``/content/drive`` or another
mount point, while that is still a mount point). Every Drive write checks it before
and after, a staged copy is removed only once verified on the live mount, and
``save()``/``flush()``/``close()`` raise :class:`~ckptkit.errors.StorageError` while it
is gone. The next writer after a remount replays the staged uploads.

**Reading never replays.** The queue (and with it the adoption of dead sessions) is
started by the first write only: ``ls``, ``inspect``, ``load`` and ``readonly=True``
managers read Drive (and the queue of a writer in the same process), and neither upload
nor delete anything.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ckptkit.errors import StorageError
from ckptkit.storage.base import Storage, join_key
from ckptkit.storage.fsspec_backend import retry_call
from ckptkit.storage.local import LocalStorage, storage_error

T = TypeVar("T")

DEFAULT_ROOT = "/content/drive/MyDrive"
ROOT_ENV = "CKPTKIT_DRIVE_ROOT"
STAGING_ENV = "CKPTKIT_DRIVE_STAGING"
MARKER = ".ckptkit-drive-root"
_COLAB_MOUNT = "/content/drive"
_JOURNAL = "journal.jsonl"
_LOCK = ".lock"
_ROOT_RECORD = "drive-root.json"  # in a run's staging: the marker token seen there
_CHUNK = 4 << 20


# -- file helpers (module level so that tests can make Drive fail) -----------------
def _copy_file(src: str, dst: str) -> str:
    """Copy ``src`` to ``dst`` (fsynced); return the sha256 of the bytes copied."""
    _mkdirs_on_drive(os.path.dirname(dst))
    h = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(_CHUNK):
            h.update(block)
            fout.write(block)
        fout.flush()
        os.fsync(fout.fileno())
    return h.hexdigest()


def _digest(path: str) -> tuple[int, str]:
    """Size and sha256 of ``path``, read back from the filesystem."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            size += len(block)
            h.update(block)
    return size, h.hexdigest()


def _covers(parent: str, key: str) -> bool:
    """Whether removing ``parent`` removes ``key``."""
    return parent == "" or key == parent or key.startswith(parent + "/")


class _VerifyError(OSError):
    """The copy on Drive does not match the staged file."""


# -- the mount --------------------------------------------------------------------
class _MountLost(OSError):
    """The Drive root is not the live mount (unmounted, or a folder left in its place)."""


def _mount_point_of(root: str) -> str | None:
    """The mount point whose loss takes ``root`` with it: Colab's ``/content/drive``,
    else the nearest enclosing mount point other than ``/`` (None: nothing to check)."""
    if root == _COLAB_MOUNT or root.startswith(_COLAB_MOUNT + "/"):
        return _COLAB_MOUNT
    path = root
    while True:
        if os.path.ismount(path):
            return None if path == os.path.dirname(path) else path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def _mount_problem(root: str, mount: str | None) -> str | None:
    """Why ``root`` is not a mounted folder (missing, or its mount point ``mount`` is
    no longer one)."""
    if mount is not None and not os.path.ismount(mount):
        return f"{mount} is not a mount point"
    if not os.path.isdir(root):
        return "the folder is gone"
    return None


class _Mount:
    """The Drive root, told apart from a folder an unmount left in its place by the
    marker file in it: a token recorded in the run's staging when first seen."""

    def __init__(self, root: str, run_staging: str) -> None:
        self.root = root
        self.mount_point = _mount_point_of(root)  # while the root is there, as when opened
        self.marker = os.path.join(root, MARKER)
        self.record = os.path.join(run_staging, _ROOT_RECORD)
        self.token: str | None = None
        # The root's filesystem while this process writes: a folder put in its place
        # on local disk has another one. (Not kept across processes: a remount may
        # change it; and not the inode, which a FUSE daemon may renumber.)
        self.device: int | None = None

    def _read_marker(self) -> str | None:
        try:
            with open(self.marker, "rb") as f:
                return f.read(200).decode("ascii", "replace").strip()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _recorded(self) -> str | None:
        try:
            with open(self.record, encoding="utf-8") as f:
                return str(json.load(f)["marker"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def establish(self) -> None:
        """Learn the marker's token, creating the marker when neither the root nor this
        run's staging has seen one (raise :class:`_MountLost` when it is not the root
        the run's staging knows). Only a writer calls this."""
        if problem := _mount_problem(self.root, self.mount_point):
            raise _MountLost(problem)
        recorded = self._recorded()
        found = self._read_marker()
        if found is None and recorded is not None:
            raise _MountLost(f"{MARKER} is missing: an empty folder left by an unmount?")
        if found is not None and recorded is not None and found != recorded:
            raise _MountLost(f"{MARKER} is not the one the staged uploads were made for")
        if found is None:
            found = uuid.uuid4().hex
            try:  # in the existing root only: O_CREAT never creates the folder
                fd = os.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:  # another process was first: use its token
                found = self._read_marker() or ""
            else:
                with os.fdopen(fd, "w", encoding="ascii") as f:
                    f.write(found + "\n")
                    f.flush()
                    os.fsync(f.fileno())
        self.token = found
        self.device = os.stat(self.root).st_dev
        if recorded != found:
            tmp = f"{self.record}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"root": self.root, "marker": found}, f)
            os.replace(tmp, self.record)

    def problem(self) -> str | None:
        """Why the root is not the live mount now, or None."""
        if problem := _mount_problem(self.root, self.mount_point):
            return problem
        with contextlib.suppress(OSError):
            if self.device is not None and os.stat(self.root).st_dev != self.device:
                return "the folder is on another filesystem now"
        found = self._read_marker()
        if found is None:
            return f"{MARKER} is missing: an empty folder left by an unmount?"
        if found != self.token:
            return f"{MARKER} is not the one the staged uploads were made for"
        return None

    def check(self) -> None:
        """Raise :class:`_MountLost` unless the root is the live mount."""
        if problem := self.problem():
            raise _MountLost(problem)


def _mkdirs_on_drive(folder: str) -> None:
    """Create ``folder`` and its missing parents, only below an existing folder that is
    (or lies below) a Drive root holding the marker: a vanished root, or the empty
    folder an unmount left, is never filled in."""
    missing: list[str] = []
    path = folder
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    if not missing:
        return
    base = path
    while not os.path.isfile(os.path.join(base, MARKER)):
        if os.path.dirname(base) == base:
            raise _MountLost(f"{path} holds no {MARKER}: not below a mounted Drive root")
        base = os.path.dirname(base)
    for path in reversed(missing):
        try:
            os.mkdir(path)  # never makedirs: its parent must exist
        except FileExistsError:
            if not os.path.isdir(path):
                raise


# -- sessions: one process's staging folder ---------------------------------------
class _Session:
    """Staged files, a journal of queued operations and an exclusive ``flock``."""

    def __init__(self, path: str, lock_fd: int) -> None:
        self.path = path
        self.files = os.path.join(path, "files")
        self._lock_fd = lock_fd
        self._mutex = threading.Lock()
        self._journal = open(os.path.join(path, _JOURNAL), "a", encoding="utf-8")  # noqa: SIM115
        self.remaining = 0  # queued operations from this session not yet done

    @classmethod
    def create(cls, run_dir: str) -> _Session:
        path = os.path.join(run_dir, f"{time.time_ns():020d}-{os.getpid()}")
        os.makedirs(os.path.join(path, "files"), exist_ok=True)
        fd = _try_lock(os.path.join(path, _LOCK))
        if fd is None:  # pragma: no cover - a fresh folder cannot be locked by anyone
            raise StorageError(f"{path}: cannot lock a new staging session")
        return cls(path, fd)

    @classmethod
    def adopt(cls, path: str) -> _Session | None:
        """The session at ``path`` when its process is gone (its lock is free)."""
        fd = _try_lock(os.path.join(path, _LOCK))
        return None if fd is None else cls(path, fd)

    def record(self, entry: dict[str, Any]) -> None:
        with self._mutex:
            self._journal.write(json.dumps(entry) + "\n")
            self._journal.flush()

    def entries(self) -> list[dict[str, Any]]:
        out = []
        try:
            with open(os.path.join(self.path, _JOURNAL), encoding="utf-8") as f:
                for line in f:
                    # A line torn by a crash is skipped: its write never returned.
                    with contextlib.suppress(ValueError):
                        out.append(json.loads(line))
        except FileNotFoundError:
            pass
        return out

    def release(self, *, remove: bool) -> None:
        """Close the journal and drop the lock; ``remove`` deletes the folder."""
        with self._mutex:
            if not self._journal.closed:
                self._journal.close()
        if remove:
            shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _try_lock(path: str) -> int | None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: never adopt
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


@dataclass
class _Op:
    """One queued operation: ``put`` (a staged file), ``delete`` or ``mkdir``."""

    kind: str
    key: str
    session: _Session
    seq: int
    staged: str = ""
    size: int = 0
    recursive: bool = False

    def entry(self) -> dict[str, Any]:
        e: dict[str, Any] = {"op": self.kind, "seq": self.seq, "key": self.key}
        if self.kind == "put":
            e["size"] = self.size
        if self.recursive:
            e["recursive"] = True
        return e


# -- the run's folder on Drive ----------------------------------------------------
class _DriveFolder:
    """The run's folder on the mount, as the uploader changes it: every change checks
    that the root is the live mount before and after, and creates folders only below
    the root (never the root itself)."""

    def __init__(self, mount: _Mount, target: str) -> None:
        self.mount = mount
        self.files = LocalStorage(target)  # reads, and the path of each key

    def path(self, key: str) -> str:
        return self.files.local_path(key) or ""

    def _checked(self, fn: Callable[[], T]) -> T:
        self.mount.check()
        out = fn()
        self.mount.check()  # the change landed on the live mount, not on a stand-in
        return out

    def _write(self, key: str, data: bytes, *, exclusive: bool) -> bool:
        path = self.path(key)
        _mkdirs_on_drive(os.path.dirname(path))
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
        try:
            fd = os.open(path, flags, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def upload(self, staged: str, key: str, size: int) -> None:
        """Copy a staged file to Drive and read it back (size + sha256)."""

        def copy() -> None:
            dst = self.path(key)
            sha = _copy_file(staged, dst)
            if _digest(dst) != (size, sha):
                raise _VerifyError(f"{dst}: read back bytes that do not match the staged file")

        self._checked(copy)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._checked(lambda: self._write(key, data, exclusive=False))

    def create_exclusive(self, key: str, data: bytes) -> bool:
        return self._checked(lambda: self._write(key, data, exclusive=True))

    def delete(self, key: str, recursive: bool = False) -> None:
        self._checked(lambda: self.files.delete(key, recursive=recursive))

    def mkdir(self, key: str) -> None:
        self._checked(lambda: _mkdirs_on_drive(self.path(key)))

    def rename(self, src: str, dst: str) -> None:
        self._checked(lambda: self.files.rename(src, dst))


# -- the queue --------------------------------------------------------------------
class _Uploader:
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
        self.mount = _Mount(root, run_staging)
        self.drive = _DriveFolder(self.mount, target)
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.direct: set[str] = set()
        self._queue: deque[_Op] = deque()
        self._cond = threading.Condition()
        self._error: StorageError | None = None
        self._busy = False  # the worker holds an operation (until its staging is cleaned)
        self._stopping = False
        self._seq = 0
        self.refs = 0
        os.makedirs(run_staging, exist_ok=True)
        try:
            self.mount.establish()  # before adopting: replay only onto the real Drive
        except _MountLost as exc:
            raise self.lost(exc) from None
        self._session = _Session.create(run_staging)
        self._adopt(run_staging)
        self._thread = threading.Thread(target=self._run, name="ckptkit-drive-upload", daemon=True)
        self._thread.start()

    def lost(self, why: BaseException | str) -> StorageError:
        """The one-line error for a root that is not the live mount."""
        return StorageError(
            f"{self.url}: Google Drive is not mounted at {self.mount.root} any more ({why}): "
            f"remount it (in Colab: drive.mount('/content/drive')), then rerun: the staged "
            f"uploads in {self.run_staging} replay"
        )

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
            session = _Session.adopt(path)
            if session is None:
                continue  # its process is alive: it uploads its own files
            ops = self._replay(session)
            session.remaining = len(ops)
            self._queue.extend(ops)
            if not ops:
                session.release(remove=True)

    @staticmethod
    def _replay(session: _Session) -> list[_Op]:
        entries = session.entries()
        done = {e["done"] for e in entries if "done" in e}
        ops: list[_Op] = []
        poisoned: set[str] = set()  # folders that lost a staged file
        for e in entries:
            try:
                op = _Op(e["op"], e["key"], session, e["seq"], recursive=bool(e.get("recursive")))
            except (KeyError, TypeError):
                continue  # a "done" line (or one this version does not know)
            if op.seq in done:
                continue
            folder = op.key.rpartition("/")[0]
            if op.kind == "put":
                op.staged = os.path.join(session.files, str(op.seq))
                op.size = int(e["size"])
                intact = os.path.isfile(op.staged) and os.path.getsize(op.staged) == op.size
                if not intact or folder in poisoned:
                    poisoned.add(folder)  # later files here (its manifest) must not go up
                    continue
            ops.append(op)
        return ops

    # -- submitting ---------------------------------------------------------------
    def _refuse(self) -> None:
        """Refuse new work when closed or when Drive is not mounted (a save fails now,
        rather than queueing a checkpoint that cannot reach Drive)."""
        if self._stopping:
            raise StorageError(f"{self.url}: the Drive storage is closed")
        self.check_mount()

    def _submit(self, op: _Op) -> None:
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

    def put(self, key: str, data: bytes) -> None:
        self._refuse()
        seq = self._next_seq()
        staged = os.path.join(self._session.files, str(seq))
        try:
            with open(staged, "wb") as f:
                f.write(data)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(staged)
            raise StorageError(
                f"{staged}: cannot stage a Drive write: {exc.strerror or exc}"
            ) from exc
        self._submit(_Op("put", key, self._session, seq, staged=staged, size=len(data)))

    def delete(self, key: str, recursive: bool) -> None:
        self._refuse()
        self._submit(_Op("delete", key, self._session, self._next_seq(), recursive=recursive))

    def mkdir(self, key: str) -> None:
        self._refuse()
        self._submit(_Op("mkdir", key, self._session, self._next_seq()))

    def pending(self) -> list[_Op]:
        with self._cond:
            return list(self._queue)

    # -- the worker ---------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (not self._queue or self._error is not None):
                    self._cond.wait()
                if self._stopping and (not self._queue or self._error is not None):
                    break
                op = self._queue[0]
                self._busy = True
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

    def _attempt(self, op: _Op) -> StorageError | None:
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

    def _apply(self, op: _Op) -> None:
        if op.kind == "put":
            self.drive.upload(op.staged, op.key, op.size)
        elif op.kind == "delete":
            self.drive.delete(op.key, recursive=op.recursive)
        elif op.kind == "mkdir":
            self.drive.mkdir(op.key)

    def _done(self, op: _Op) -> None:
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
            self.check_mount()  # outside the lock: a slow mount must not stall the worker
            with self._cond:
                if (self._queue or self._busy) and self._error is None and not until():
                    self._cond.wait(0.5)

    def touches(self, key: str) -> bool:
        """Whether a queued operation writes, removes or lies under ``key``."""
        with self._cond:
            return any(_covers(op.key, key) or _covers(key, op.key) for op in self._queue)

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
            self._thread.join(timeout=None if self._error is None else 60)


# -- one uploader per run and process ---------------------------------------------
_UPLOADERS: dict[tuple[str, str], _Uploader] = {}
_REGISTRY_LOCK = threading.Lock()


def _registry_key(target: str, run_staging: str) -> tuple[str, str]:
    return (os.path.realpath(target), os.path.realpath(run_staging))


def _acquire(
    url: str, root: str, target: str, run_staging: str, attempts: int, backoff: float
) -> _Uploader:
    key = _registry_key(target, run_staging)
    with _REGISTRY_LOCK:
        up = _UPLOADERS.get(key)
        if up is None:
            up = _Uploader(url, root, target, run_staging, attempts=attempts, backoff=backoff)
            _UPLOADERS[key] = up
        up.refs += 1
        return up


def _running(target: str, run_staging: str) -> _Uploader | None:
    """This process's queue for the run, when a writer started one."""
    with _REGISTRY_LOCK:
        return _UPLOADERS.get(_registry_key(target, run_staging))


def _release(up: _Uploader) -> None:
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
            _release(up)
        except Exception as exc:  # the staged files stay for the next process
            print(f"ckptkit: Drive uploads left staged: {exc}", file=sys.stderr, flush=True)


def _slug(rel: str, target: str) -> str:
    digest = hashlib.sha1(os.path.abspath(target).encode()).hexdigest()[:10]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", rel).strip("_")[:80] + "-" + digest


def default_staging() -> str:
    """Where staged writes go unless ``CKPTKIT_DRIVE_STAGING`` says otherwise."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "ckptkit", "drive-staging")


class _Run:
    """What a DriveStorage and its children share: where the run is, and its queue once
    the first write started it (reads alone never start one)."""

    def __init__(
        self, url: str, root: str, target: str, run_staging: str, attempts: int, backoff: float
    ) -> None:
        self.url = url
        self.root = root
        self.target = target
        self.run_staging = run_staging
        self.attempts = attempts
        self.backoff = backoff
        self.files = LocalStorage(target)  # reads from Drive
        self.up: _Uploader | None = None  # this storage's reference to the queue
        self.closed = False
        self._mutex = threading.Lock()

    def writer(self) -> _Uploader:
        """The run's queue, started (and dead sessions adopted) on the first write."""
        with self._mutex:
            if self.closed:
                raise StorageError(f"{self.url}: the Drive storage is closed")
            if self.up is None:
                try:
                    self.up = _acquire(
                        self.url, self.root, self.target, self.run_staging,
                        self.attempts, self.backoff,
                    )  # fmt: skip
                except StorageError:
                    raise
                except OSError as exc:
                    raise StorageError(
                        f"{self.url}: cannot set up Drive staging in {self.run_staging}: {exc}"
                    ) from exc
            return self.up

    def view(self) -> _Uploader | None:
        """The queue whose pending writes reads must see: ours, or a writer's in this
        process; None when nothing of this run is queued here."""
        return self.up or _running(self.target, self.run_staging)

    def pending(self) -> list[_Op]:
        up = self.view()
        return up.pending() if up is not None else []

    def release(self) -> None:
        with self._mutex:
            up, self.up = self.up, None
            self.closed = True
        if up is not None:
            _release(up)


class DriveStorage:
    """A folder on a mounted Google Drive, written through an ordered upload queue.

    ``drive://T-L/runs/etth1`` is ``$CKPTKIT_DRIVE_ROOT/T-L/runs/etth1`` (default root
    ``/content/drive/MyDrive``). Storages opened on the same URL in one process share
    one queue, started by the first write; the last one closed stops it. ``staging``,
    ``attempts`` (tries per round) and ``backoff`` (seconds, doubling) apply when the
    queue is created.
    """

    commit = "marker"
    write_behind = True  # save() returns before Drive has the files: commit on flush()

    def __init__(
        self,
        url: str,
        *,
        staging: str | None = None,
        attempts: int = 5,
        backoff: float = 1.0,
    ) -> None:
        if not isinstance(url, str) or not url.startswith("drive://"):
            raise StorageError(f"{url!r}: not a Drive URL: write drive://Folder/runs/exp1")
        rel = join_key(url[len("drive://") :])
        if not rel or "?" in rel or ".." in rel.split("/"):
            raise StorageError(
                f"{url}: give a folder inside your Drive, e.g. drive://Folder/runs/exp1"
            )
        root = os.path.abspath(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)
        if _mount_problem(root, _mount_point_of(root)) is not None:
            raise StorageError(
                f"Google Drive is not mounted at {root}: in Colab run `from google.colab import "
                f"drive; drive.mount('/content/drive')` (or set {ROOT_ENV})"
            )
        target = os.path.join(root, *rel.split("/"))
        staging_root = staging or os.environ.get(STAGING_ENV) or default_staging()
        run_staging = os.path.join(staging_root, _slug(rel, target))
        self.url = url.rstrip("/")
        self._run = _Run(self.url, root, target, run_staging, attempts, backoff)
        self._prefix = ""
        self._owner = True
        self._closed = False

    # -- keys -------------------------------------------------------------------
    def _k(self, key: str) -> str:
        return join_key(self._prefix, key)

    def child(self, key: str) -> DriveStorage:
        sub = object.__new__(DriveStorage)
        sub._run = self._run
        sub.url = self.url_of(key)
        sub._prefix = self._k(key)
        sub._owner = False
        sub._closed = False
        return sub

    def url_of(self, key: str) -> str:
        key = join_key(key)
        return f"{self.url}/{key}" if key else self.url

    def local_path(self, key: str) -> str | None:
        return None  # a key may live in staging or on Drive, and move between them

    def _missing(self, key: str) -> FileNotFoundError:
        return FileNotFoundError(2, "No such file or directory", self.url_of(key))

    # -- the merged view -----------------------------------------------------------
    def _staged(self, key: str) -> str | None | bool:
        """Staged path of the newest queued write of ``key``; False when a queued
        delete removes it; None when the queue does not know it (ask Drive)."""
        state: str | None | bool = None
        for op in self._run.pending():
            if op.kind == "put" and op.key == key:
                state = op.staged
            elif op.kind == "delete" and _covers(op.key, key):
                state = False
        return state

    def _local(self, key: str, read: Callable[[str], T], drive: Callable[[str], T]) -> T:
        """``read(staged)`` when ``key`` is queued, else ``drive(key)``; a staged file
        removed meanwhile has been verified on Drive, so Drive is asked then."""
        full = self._k(key)
        state = self._staged(full)
        if state is False:
            raise self._missing(key)
        if state:
            try:
                return read(state)
            except FileNotFoundError:
                pass
        try:
            return drive(full)
        except FileNotFoundError:
            raise self._missing(key) from None

    def read_bytes(self, key: str) -> bytes:
        def read(path: str) -> bytes:
            with open(path, "rb") as f:
                return f.read()

        return self._local(key, read, self._run.files.read_bytes)

    def size(self, key: str) -> int:
        return self._local(key, os.path.getsize, self._run.files.size)

    def mtime(self, key: str) -> float | None:
        try:
            return self._local(key, os.path.getmtime, self._run.files.mtime)
        except FileNotFoundError:
            return None

    def sha256(self, key: str) -> str | None:
        return None

    def _queued_presence(self, full: str, *, dirs_only: bool) -> bool | None:
        state: bool | None = None
        for op in self._run.pending():
            if op.kind == "delete" and _covers(op.key, full):
                state = False
            elif op.kind in ("put", "mkdir") and _covers(full, op.key):
                is_file = op.kind == "put" and op.key == full
                state = not (dirs_only and is_file)
        return state

    def exists(self, key: str) -> bool:
        full = self._k(key)
        state = self._queued_presence(full, dirs_only=False)
        return self._run.files.exists(full) if state is None else state

    def isdir(self, key: str) -> bool:
        full = self._k(key)
        state = self._queued_presence(full, dirs_only=True)
        return self._run.files.isdir(full) if state is None else state

    def listdir(self, key: str = "") -> list[str]:
        full = self._k(key)
        names = set(self._run.files.listdir(full))
        prefix = full + "/" if full else ""
        for op in self._run.pending():
            if op.kind == "delete" and _covers(op.key, full):
                names.clear()
            elif op.key.startswith(prefix) and op.key != full:
                name = op.key[len(prefix) :].split("/", 1)[0]
                if op.kind == "delete":
                    if "/" not in op.key[len(prefix) :]:
                        names.discard(name)
                else:
                    names.add(name)
        return sorted(names)

    # -- writes -------------------------------------------------------------------
    def _direct(self, full: str, fn: Callable[[_DriveFolder], T]) -> T:
        """Run ``fn`` on Drive now, once no queued operation touches ``full``."""
        up = self._run.writer()
        up.wait(until=lambda: not up.touches(full))
        try:
            return retry_call(
                lambda: fn(up.drive),
                attempts=up.attempts,
                backoff=up.backoff,
                transient=lambda exc: isinstance(exc, OSError),
            )
        except _MountLost as exc:
            raise up.lost(exc) from None
        except StorageError:
            raise
        except OSError as exc:
            raise storage_error(self.url_of(full[len(self._prefix) :]), exc) from exc

    def write_bytes(self, key: str, data: bytes) -> None:
        """Stage ``data`` and queue its upload; returns before Drive has it."""
        full = self._k(key)
        up = self._run.writer()
        if full in up.direct:
            self._direct(full, lambda drive: drive.write_bytes(full, data))
        else:
            up.put(full, data)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create ``key`` on Drive now (O_EXCL on the mount: best effort); this key's
        later writes and deletes go to Drive directly as well."""
        full = self._k(key)
        self._run.writer().direct.add(full)
        return self._direct(full, lambda drive: drive.create_exclusive(full, data))

    def delete(self, key: str, recursive: bool = False) -> None:
        """Queue the removal behind every write before it (missing keys are ignored)."""
        full = self._k(key)
        up = self._run.writer()
        if full in up.direct:
            self._direct(full, lambda drive: drive.delete(full, recursive=recursive))
            return
        if not recursive and self.isdir(key) and self.listdir(key):
            raise StorageError(f"{self.url_of(key)}: directory not empty")
        up.delete(full, recursive)

    def mkdir(self, key: str) -> None:
        self._run.writer().mkdir(self._k(key))

    def rename(self, src: str, dst: str) -> None:
        """Flush, then rename on Drive (not reliably atomic there: hence ``marker``)."""
        self._run.writer()
        self.flush()
        self._direct(self._k(dst), lambda drive: drive.rename(self._k(src), self._k(dst)))

    def sync_dir(self, key: str) -> None:
        pass  # ordering and verification are the queue's job

    def invalidate(self) -> None:
        pass  # the mount has no listing cache of ours

    def flush(self) -> None:
        """Block until every queued write is verified on Drive; raise StorageError when
        one still fails after the retries, or Drive is not mounted (its staged copy is
        kept). Without a queue in this process there is nothing to wait for."""
        up = self._run.view()
        if up is not None:
            up.wait()

    def close(self) -> None:
        """Flush; the last storage closed on this run stops the upload thread."""
        if self._closed:
            return
        self._closed = True
        if self._owner:
            self._run.release()
        else:
            self.flush()

    def pending(self) -> list[str]:
        """Keys still queued for Drive, oldest first (for progress messages)."""
        return [op.key for op in self._run.pending()]


_: type[Storage] = DriveStorage  # structural check
__all__ = ["DEFAULT_ROOT", "MARKER", "ROOT_ENV", "STAGING_ENV", "DriveStorage", "default_staging"]
