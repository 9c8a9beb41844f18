"""``DriveStorage``: the read view (Drive merged with this process's queue) and the
routing of writes to the queue, which the first write starts."""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

from ckptkit.errors import StorageError
from ckptkit.storage import confined
from ckptkit.storage import drive as _package  # the seam: DEFAULT_ROOT
from ckptkit.storage.base import Storage, join_key
from ckptkit.storage.confined import Member
from ckptkit.storage.drive._answer import MountHung
from ckptkit.storage.drive._journal import Op
from ckptkit.storage.drive._mount import (
    DriveFolder,
    Mount,
    MountLost,
    mount_point_of,
    mount_problem,
)
from ckptkit.storage.drive._uploader import Uploader, acquire, covers, release, running
from ckptkit.storage.fsspec_backend import retry_call
from ckptkit.storage.local import LocalStorage, storage_error

T = TypeVar("T")

ROOT_ENV = "CKPTKIT_DRIVE_ROOT"
STAGING_ENV = "CKPTKIT_DRIVE_STAGING"


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

    def __init__(self, url: str, mount: Mount, target: str, attempts: int, backoff: float) -> None:
        self.url = url
        self.root = mount.root
        self.target = target
        self.run_staging = mount.run_staging
        self.attempts = attempts
        self.backoff = backoff
        self.files = LocalStorage(target)  # reads from Drive: through on_drive() only
        self.mount = mount  # reads check nothing on it: they only need its bound on calls
        self.up: Uploader | None = None  # this storage's reference to the queue
        self.closed = False
        self._mutex = threading.Lock()

    def on_drive(self, fn: Callable[[], T]) -> T:
        """``fn()``, a read of the mount, given up when the mount does not answer."""
        try:
            return self.mount.answering.call(fn)
        except MountHung as exc:
            raise self.mount.lost(self.url, exc) from None

    def writer(self) -> Uploader:
        """The run's queue, started (and dead sessions adopted) on the first write."""
        with self._mutex:
            if self.closed:
                raise StorageError(f"{self.url}: the Drive storage is closed")
            if self.up is None:
                try:
                    self.up = acquire(
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

    def view(self) -> Uploader | None:
        """The queue whose pending writes reads must see: ours, or a writer's in this
        process; None when nothing of this run is queued here."""
        return self.up or running(self.target, self.run_staging)

    def pending(self) -> list[Op]:
        up = self.view()
        return up.pending() if up is not None else []

    def release(self) -> None:
        with self._mutex:
            up, self.up = self.up, None
            self.closed = True
        if up is not None:
            release(up)


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
        root = os.path.abspath(os.environ.get(ROOT_ENV) or _package.DEFAULT_ROOT)
        target = os.path.join(root, *rel.split("/"))
        staging_root = staging or os.environ.get(STAGING_ENV) or default_staging()
        run_staging = os.path.join(staging_root, _slug(rel, target))
        self.url = url.rstrip("/")
        mount = Mount(root, run_staging)
        try:
            unmounted = mount.answering.call(lambda: mount_problem(root, mount_point_of(root)))
        except MountHung as exc:
            raise mount.lost(self.url, exc) from None
        if unmounted is not None:
            raise StorageError(
                f"Google Drive is not mounted at {root}: in Colab run `from google.colab import "
                f"drive; drive.mount('/content/drive')` (or set {ROOT_ENV})"
            )
        # An empty folder left by an unmount, where this machine's staging knows the
        # run: say so (readers too) rather than show an empty run.
        if why := mount.known_problem():
            raise mount.lost(self.url, why)
        self._run = _Run(self.url, mount, target, attempts, backoff)
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
            elif op.kind == "delete" and covers(op.key, key):
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

    def open_member(
        self, key: str, *, size: int | None = None, max_size: int | None = None
    ) -> Member:
        """Open ``key`` confined (see :mod:`ckptkit.storage.confined`): its staged copy
        while queued, else the file on the mount, no link followed below the run."""
        url = self.url_of(key)
        confined.key_parts(key, url)

        def staged(path: str) -> Member:
            return confined.open_local(path, "", url=url, size=size, max_size=max_size)

        def on_drive(full: str) -> Member:
            # LocalStorage's opener: no link followed, a failing mount (EIO...) is one line.
            # Each later read (and the close) is bounded as the open is: a daemon can hang
            # midway through a large file.
            return self._run.on_drive(
                lambda: self._run.files.open_member(full, size=size, max_size=max_size)
            ).through(self._run.on_drive)

        return self._local(key, staged, on_drive)

    def read_bytes(self, key: str) -> bytes:
        """The whole file; read from the mount in one bounded call (a manifest, the run
        lock: a hang there must not stop the loop)."""
        url = self.url_of(key)
        confined.key_parts(key, url)

        def staged(path: str) -> bytes:
            with confined.open_local(path, "", url=url) as member:
                return member.read()

        def on_drive(full: str) -> bytes:
            def read() -> bytes:
                with self._run.files.open_member(full) as member:
                    return member.read()

            return self._run.on_drive(read)

        return self._local(key, staged, on_drive)

    def size(self, key: str) -> int:
        with self.open_member(key) as member:
            return member.size

    def mtime(self, key: str) -> float | None:
        try:
            return self._local(
                key,
                os.path.getmtime,
                lambda full: self._run.on_drive(lambda: self._run.files.mtime(full)),
            )
        except FileNotFoundError:
            return None

    def sha256(self, key: str) -> str | None:
        return None

    def _queued_presence(self, full: str, *, dirs_only: bool) -> bool | None:
        state: bool | None = None
        for op in self._run.pending():
            if op.kind == "delete" and covers(op.key, full):
                state = False
            elif op.kind in ("put", "mkdir") and covers(full, op.key):
                is_file = op.kind == "put" and op.key == full
                state = not (dirs_only and is_file)
        return state

    def exists(self, key: str) -> bool:
        full = self._k(key)
        state = self._queued_presence(full, dirs_only=False)
        if state is None:
            return self._run.on_drive(lambda: self._run.files.exists(full))
        return state

    def isdir(self, key: str) -> bool:
        full = self._k(key)
        state = self._queued_presence(full, dirs_only=True)
        if state is None:
            return self._run.on_drive(lambda: self._run.files.isdir(full))
        return state

    def listdir(self, key: str = "") -> list[str]:
        full = self._k(key)
        # The queue first, then Drive: an operation that completes in between is then
        # both on Drive and in the snapshot (never in neither, which would show a file
        # that was just deleted, or hide one that was just uploaded).
        pending = self._run.pending()
        listed = self._run.on_drive(lambda: self._run.files.listdir(full))
        names = {n for n in listed if not _package.PARTIAL.match(n)}
        prefix = full + "/" if full else ""
        for op in pending:
            if op.kind == "delete" and covers(op.key, full):
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
    def _direct(self, full: str, fn: Callable[[DriveFolder], T]) -> T:
        """Run ``fn`` on Drive now, once no queued operation touches ``full``. A lost
        mount fails at once: the caller (the run lock) is waiting."""
        up = self._run.writer()
        up.wait(until=lambda: not up.touches(full))
        try:
            return retry_call(
                lambda: up.mount.answering.call(lambda: fn(up.drive)),
                attempts=up.attempts,
                backoff=up.backoff,
                transient=lambda exc: (
                    isinstance(exc, OSError) and not isinstance(exc, MountLost | MountHung)
                ),
            )
        except (MountLost, MountHung) as exc:
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

    def write_stream(self, key: str, chunks: Iterable[memoryview], size: int | None = None) -> None:
        """Stage ``chunks`` as they come (no copy of the whole object) and queue the upload."""
        full = self._k(key)
        up = self._run.writer()
        if full in up.direct:
            data = b"".join(chunks)
            self._direct(full, lambda drive: drive.write_bytes(full, data))
        else:
            up.put(full, chunks)

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
        kept). A storage that only read has written nothing to wait for (a reader's
        close() must not block on, or fail with, a writer's uploads)."""
        up = self._run.up
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
