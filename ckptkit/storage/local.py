"""Local filesystem storage: plain paths and ``file://`` URLs; commits by atomic rename."""

from __future__ import annotations

import contextlib
import copy
import errno
import os
import shutil
import stat
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from ckptkit.errors import CorruptCheckpointError, StorageError
from ckptkit.storage import confined, direct, freeing
from ckptkit.storage.base import Storage, join_key

# One write(2) call moves at most this much (Linux caps a call just below 2 GiB).
_WRITE_MAX = 1 << 30


# Bytes written between two starts of writeback (see _drop_cached).
_KICK = 32 << 20


def _sync_and_drop(fd: int) -> None:
    os.fsync(fd)
    _drop_cached(fd)


def _drop_cached(fd: int, offset: int = 0, length: int = 0) -> None:
    """POSIX_FADV_DONTNEED on a range of ``fd`` (0: to the end). On pages still dirty it
    starts their writeback without waiting, as sync_file_range does: called every
    _KICK bytes, the disk works while the rest is copied in, and the final fsync waits
    for the tail only. On a durable file it drops the pages: a checkpoint is written far
    more often than read back, so they would only evict what training reads, and the
    next save (a whole new copy before the old one is rotated away) reuses this memory
    instead of claiming more. A same-process restore then reads from the disk."""
    if hasattr(os, "posix_fadvise"):  # not on macOS
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def storage_error(url: str, exc: OSError) -> StorageError:
    """``exc`` as a one-line StorageError that says what to do (full disk, permissions)."""
    if exc.errno == errno.ENOSPC:
        hint = "the disk is full: free space or point the run at another location"
    elif exc.errno == errno.EDQUOT:
        hint = "the disk quota is exceeded: free space or point the run at another location"
    elif exc.errno == errno.EROFS:
        hint = "the filesystem is read-only: choose a writable location"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        hint = "permission denied: choose a writable location"
    else:
        hint = exc.strerror or str(exc)
    return StorageError(f"{url}: {hint}")


class LocalStorage:
    """A directory on a local (POSIX) filesystem.

    The root is resolved once, here (it may be a symlink: a run kept on a bigger disk);
    below it nothing is followed. Reads go through :mod:`ckptkit.storage.confined`;
    writes, renames and deletes open each component with ``O_NOFOLLOW`` as well, so a
    symlink inside the run is replaced or removed, never written or deleted through.
    """

    commit = "rename"
    # write_stream copies or writes each chunk before it takes the next (os.write, or
    # direct.py's bounce buffers) and writes a file once (storage/base.py).
    releases_chunks = True

    def __init__(self, url: str) -> None:
        path = url[len("file://") :] if url.startswith("file://") else url
        if not path:
            raise StorageError("empty path: give a directory such as runs/exp1")
        self.root = os.path.realpath(os.path.abspath(os.path.expanduser(path)))
        self.url = url
        self._prefix = ""  # a child's keys are below this key of the resolved root
        self._batch = threading.local()  # synced_together's pending files, per thread

    # -- keys ---------------------------------------------------------------
    def _key(self, key: str) -> str:
        return join_key(self._prefix, key)

    def _checked(self, key: str) -> str:
        """``_key(key)`` once ``key`` itself passed the name rule (join_key would quietly
        turn ``/abs`` into ``abs``)."""
        confined.key_parts(key, self.url_of(key))
        return self._key(key)

    def _p(self, key: str) -> str:
        key = self._key(key)
        return os.path.join(self.root, *key.split("/")) if key else self.root

    def child(self, key: str) -> LocalStorage:
        sub = copy.copy(self)
        sub._prefix = self._key(key)
        sub.url = self.url_of(key)
        return sub

    def url_of(self, key: str) -> str:
        return self.url.rstrip("/") + "/" + key if key else self.url

    def local_path(self, key: str) -> str | None:
        return self._p(key)

    # -- confined traversal ---------------------------------------------------
    def _parent(self, key: str, *, create: bool = False) -> tuple[int, str] | None:
        """``(fd of the parent folder, last component)`` of ``key``, every folder opened
        without following links (created when ``create``); None when the parent is not
        a folder inside the storage (missing, or a link: nothing of ours is there)."""
        url = self.url_of(key)
        try:
            parts = confined.key_parts(self._checked(key), url)
        except CorruptCheckpointError as exc:  # "..", absolute...: never written or deleted
            raise StorageError(str(exc)) from None
        if not parts:
            raise StorageError(f"{url}: the storage root itself cannot be used here")
        if create:
            self._makedirs(parts[:-1], url)
        try:
            return confined.open_dir(self.root, parts[:-1], url), parts[-1]
        except FileNotFoundError:
            if create:
                raise
            return None
        except CorruptCheckpointError:
            if create:
                raise StorageError(
                    f"{url}: a folder on the way is a symbolic link (or not a folder): "
                    "ckptkit never writes through links inside a run; remove it"
                ) from None
            return None

    def _makedirs(self, parts: list[str], url: str) -> None:
        os.makedirs(self.root, exist_ok=True)
        for i in range(len(parts)):
            try:
                fd = confined.open_dir(self.root, parts[:i], url)
            except CorruptCheckpointError:
                return  # reported by the caller's open_dir
            try:
                os.mkdir(parts[i], 0o777, dir_fd=fd)
            except FileExistsError:
                pass
            finally:
                os.close(fd)

    # -- reads --------------------------------------------------------------
    def open_member(
        self, key: str, *, size: int | None = None, max_size: int | None = None
    ) -> confined.Member:
        """Open ``key`` confined (see :mod:`ckptkit.storage.confined`)."""
        try:
            return confined.open_local(
                self.root, self._checked(key), url=self.url_of(key), size=size, max_size=max_size
            )
        except (FileNotFoundError, CorruptCheckpointError):
            raise
        except OSError as exc:
            raise storage_error(self.url_of(key), exc) from exc

    def read_bytes(self, key: str) -> bytes:
        with self.open_member(key) as member:
            return member.read()

    def exists(self, key: str) -> bool:
        return os.path.exists(self._p(key))

    def isdir(self, key: str) -> bool:
        return os.path.isdir(self._p(key))

    def size(self, key: str) -> int:
        with self.open_member(key) as member:
            return member.size

    def mtime(self, key: str) -> float | None:
        try:
            return os.path.getmtime(self._p(key))
        except OSError:
            return None

    def listdir(self, key: str = "") -> list[str]:
        try:
            return sorted(os.listdir(self._p(key)))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise storage_error(self.url_of(key), exc) from exc

    def sha256(self, key: str) -> str | None:
        return None

    # -- writes -------------------------------------------------------------
    def mkdir(self, key: str) -> None:
        try:
            if not self._key(key):
                os.makedirs(self.root, exist_ok=True)
                return
            parent = self._parent(key, create=True)
            assert parent is not None
            fd, name = parent
            try:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o777, dir_fd=fd)
                os.close(os.open(name, confined.DIR_FLAGS, dir_fd=fd))  # not a link
            finally:
                os.close(fd)
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            raise storage_error(self.url_of(key), exc) from exc

    def _create(self, key: str, *, exclusive: bool) -> int | None:
        """A descriptor of a fresh regular file at ``key``; None when ``exclusive`` and
        something is there. A link (or FIFO...) at ``key`` is removed, never written
        through."""
        parent = self._parent(key, create=True)
        assert parent is not None
        dir_fd, name = parent
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | confined._CLOEXEC
        try:
            for _ in range(3):
                try:
                    fd = os.open(
                        name, flags | (os.O_EXCL if exclusive else os.O_TRUNC), 0o644, dir_fd=dir_fd
                    )
                except FileExistsError:
                    return None
                except OSError as exc:
                    # ELOOP: a symlink; ENXIO: a FIFO nobody reads. Replace, don't follow.
                    if exc.errno not in (errno.ELOOP, errno.ENXIO):
                        raise
                    os.unlink(name, dir_fd=dir_fd)
                    continue
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    return fd
                os.close(fd)  # a FIFO or device someone planted: replace it
                os.unlink(name, dir_fd=dir_fd)
            raise StorageError(f"{self.url_of(key)}: keeps being replaced while written")
        finally:
            os.close(dir_fd)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._write(key, [memoryview(data)], len(data))

    def write_stream(self, key: str, chunks: Iterable[memoryview], size: int | None = None) -> None:
        """Write ``chunks`` straight from the caller's memory (``os.write`` loop; a large
        file of known ``size`` around the page cache: ``storage/direct.py``), then fsync:
        no copy of the object is ever held."""
        self._write(key, chunks, size)

    @contextlib.contextmanager
    def synced_together(self) -> Iterator[None]:
        """Files written by this thread inside the block are made durable together when
        it ends: their fsyncs run at once, so the filesystem commits them in one journal
        transaction instead of one each (a checkpoint's 4 files: ~23 -> ~8-16 ms here).
        Nothing written inside is durable before the block ends; an exception abandons
        them unsynced (a commit then removes them)."""
        if getattr(self._batch, "fds", None) is not None:  # nested: the outer one syncs
            yield
            return
        self._batch.fds = pending = []
        try:
            yield
        except BaseException:
            for fd, _ in pending:
                os.close(fd)
            raise
        finally:
            self._batch.fds = None
        try:
            with ThreadPoolExecutor(min(8, len(pending) or 1)) as pool:
                futures = {key: pool.submit(_sync_and_drop, fd) for fd, key in pending}
            for key, future in futures.items():
                exc = future.exception()
                if isinstance(exc, OSError):
                    raise storage_error(self.url_of(key), exc) from exc
                if exc is not None:
                    raise exc
        finally:
            for fd, _ in pending:
                os.close(fd)

    def _write(self, key: str, chunks: Iterable[memoryview], size: int | None = None) -> None:
        if size is None or size >= freeing.MIN_SIZE:
            freeing.wait()  # the space of files removed before is free before it is claimed
        try:
            fd = self._create(key, exclusive=False)
            assert fd is not None
            batch = getattr(self._batch, "fds", None)
            try:
                written = flushed = 0
                if direct.usable(fd, size):
                    written = flushed = direct.write(fd, chunks, size)
                    chunks = ()
                for chunk in chunks:
                    view = memoryview(chunk).cast("B")
                    while view:
                        n = os.write(fd, view[:_WRITE_MAX])
                        view = view[n:]
                        written += n
                        if written - flushed >= _KICK:
                            _drop_cached(fd, flushed, written - flushed)
                            flushed = written
                if batch is not None:  # synced with the others when the block ends
                    if written > flushed:
                        _drop_cached(fd, flushed, written - flushed)
                    batch.append((fd, key))
                    fd = None
                else:
                    _sync_and_drop(fd)
            finally:
                if fd is not None:
                    os.close(fd)
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            raise storage_error(self.url_of(key), exc) from exc

    def create_exclusive(self, key: str, data: bytes) -> bool:
        try:
            fd = self._create(key, exclusive=True)
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            raise storage_error(self.url_of(key), exc) from exc
        if fd is None:
            return False
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            # The file is ours (O_EXCL): an empty or partial one must not stay behind,
            # where it would read as a lock of a crashed writer (a full disk does this).
            with contextlib.suppress(OSError):
                self.delete(key)
            raise storage_error(self.url_of(key), exc) from exc
        return True

    def delete(self, key: str, recursive: bool = False) -> None:
        """Remove ``key``: a link is unlinked (its target is never touched), a folder is
        removed without following links inside it; keys behind a link are not ours."""
        try:
            if not self._key(key):  # the (resolved) root itself
                shutil.rmtree(self.root) if recursive else os.rmdir(self.root)
                return
            parent = self._parent(key)
            if parent is None:
                return
            fd, name = parent
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
                held: list[int] = []  # large files unlinked but open: freed off this thread
                try:
                    if not stat.S_ISDIR(info.st_mode):
                        size = info.st_size if stat.S_ISREG(info.st_mode) else 0
                        freeing.unlink(name, fd, size, held)
                    elif recursive:
                        _remove_tree(fd, name, held)
                    else:
                        os.rmdir(name, dir_fd=fd)
                finally:
                    freeing.close_later(held)
            finally:
                os.close(fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            raise storage_error(self.url_of(key), exc) from exc

    def rename(self, src: str, dst: str) -> None:
        try:
            a = self._parent(src)
            if a is None:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), self.url_of(src))
            try:
                b = self._parent(dst, create=True)
                assert b is not None
                try:
                    os.rename(a[1], b[1], src_dir_fd=a[0], dst_dir_fd=b[0])
                finally:
                    os.close(b[0])
            finally:
                os.close(a[0])
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            raise storage_error(self.url_of(dst), exc) from exc

    def sync_dir(self, key: str) -> None:
        try:
            full = self._key(key)
            fd = confined.open_dir(self.root, full.split("/") if full else [], self.url_of(key))
        except (OSError, CorruptCheckpointError):
            return
        try:
            os.fsync(fd)
        except OSError:
            pass  # some filesystems (and FUSE mounts) refuse fsync on directories
        finally:
            os.close(fd)

    def invalidate(self) -> None:
        pass

    def flush(self) -> None:
        freeing.wait()  # removed files' space is free again (freeing.py)

    def close(self) -> None:
        freeing.wait()


def _file_size(entry: os.DirEntry[str]) -> int:
    """A regular file's size (0 for anything else, or when it is gone)."""
    try:
        return (
            entry.stat(follow_symlinks=False).st_size if entry.is_file(follow_symlinks=False) else 0
        )
    except OSError:
        return 0


def _remove_tree(parent_fd: int, name: str, held: list[int]) -> None:
    """Remove the folder ``name`` of ``parent_fd`` and everything in it, descending only
    into real folders (opened ``O_NOFOLLOW``): a link inside is unlinked, never followed
    (shutil.rmtree takes ``dir_fd`` only from Python 3.11)."""
    try:
        fd = os.open(name, confined.DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        os.unlink(name, dir_fd=parent_fd)  # swapped for a link meanwhile: remove the link
        return
    try:
        with os.scandir(fd) as it:
            entries = [(e.name, e.is_dir(follow_symlinks=False), _file_size(e)) for e in it]
        for entry, is_dir, size in entries:
            with contextlib.suppress(FileNotFoundError):
                if is_dir:
                    _remove_tree(fd, entry, held)
                else:
                    freeing.unlink(entry, fd, size, held)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)


_: type[Storage] = LocalStorage  # structural check
__all__ = ["LocalStorage", "join_key"]
