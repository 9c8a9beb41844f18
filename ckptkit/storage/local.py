"""Local filesystem storage: plain paths and ``file://`` URLs; commits by atomic rename."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil

from ckptkit.errors import StorageError
from ckptkit.storage.base import Storage, join_key


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
    """A directory on a local (POSIX) filesystem."""

    commit = "rename"

    def __init__(self, url: str) -> None:
        path = url[len("file://") :] if url.startswith("file://") else url
        if not path:
            raise StorageError("empty path: give a directory such as runs/exp1")
        self.root = os.path.abspath(os.path.expanduser(path))
        self.url = url

    # -- keys ---------------------------------------------------------------
    def _p(self, key: str) -> str:
        return os.path.join(self.root, *[k for k in key.split("/") if k]) if key else self.root

    def child(self, key: str) -> LocalStorage:
        sub = LocalStorage(self._p(key))
        sub.url = self.url_of(key)
        return sub

    def url_of(self, key: str) -> str:
        return self.url.rstrip("/") + "/" + key if key else self.url

    def local_path(self, key: str) -> str | None:
        return self._p(key)

    # -- reads --------------------------------------------------------------
    def read_bytes(self, key: str) -> bytes:
        try:
            with open(self._p(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise storage_error(self.url_of(key), exc) from exc

    def exists(self, key: str) -> bool:
        return os.path.exists(self._p(key))

    def isdir(self, key: str) -> bool:
        return os.path.isdir(self._p(key))

    def size(self, key: str) -> int:
        try:
            return os.path.getsize(self._p(key))
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise storage_error(self.url_of(key), exc) from exc

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
            os.makedirs(self._p(key), exist_ok=True)
        except OSError as exc:
            raise storage_error(self.url_of(key), exc) from exc

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._p(key)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise storage_error(self.url_of(key), exc) from exc

    def create_exclusive(self, key: str, data: bytes) -> bool:
        path = self._p(key)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise storage_error(self.url_of(key), exc) from exc
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            # The file is ours (O_EXCL): an empty or partial one must not stay behind,
            # where it would read as a lock of a crashed writer (a full disk does this).
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise storage_error(self.url_of(key), exc) from exc
        return True

    def delete(self, key: str, recursive: bool = False) -> None:
        path = self._p(key)
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                if recursive:
                    shutil.rmtree(path)
                else:
                    os.rmdir(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise storage_error(self.url_of(key), exc) from exc

    def rename(self, src: str, dst: str) -> None:
        try:
            os.rename(self._p(src), self._p(dst))
        except OSError as exc:
            raise storage_error(self.url_of(dst), exc) from exc

    def sync_dir(self, key: str) -> None:
        try:
            fd = os.open(self._p(key), os.O_RDONLY)
        except OSError:
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
        pass

    def close(self) -> None:
        pass


_: type[Storage] = LocalStorage  # structural check
__all__ = ["LocalStorage", "join_key"]
