"""The one way a file inside a checkpoint is opened: confined, regular, bounded.

Every read of a checkpoint's files (native manifests and members, legacy ``.pt`` files,
HF Trainer directories and their shard indexes) goes through :func:`open_member`:

- the key is checked with :func:`~ckptkit.storage.names.check_member_name` (no ``..``,
  ``.``, empty or absolute components);
- on local disks every component below the storage root is opened with ``dir_fd`` and
  ``O_NOFOLLOW`` (``O_DIRECTORY`` for folders, ``O_NONBLOCK`` for the file), so a
  symlink anywhere inside the run is refused instead of followed; the root itself was
  resolved once when the storage was opened (a run kept on a bigger disk behind a
  symlink is normal);
- the opened descriptor is checked with ``fstat``, not the path: a regular file of the
  recorded size, else :class:`~ckptkit.errors.CorruptCheckpointError`. A FIFO, device,
  socket or directory is refused before it is ever read (it would hang or never end);
- reads stop at the recorded size (or, without one, the size ``fstat`` reported), so a
  file that grows, or ``/dev/zero``, cannot exhaust memory.

Messages name the member and why; never the size or content of what a link points to.
Native tensor files are read with :meth:`Member.readinto` (``pread`` into the
caller's memory), or, for a restore into a model, mapped from the checked descriptor
under a read lease where nothing can truncate them meanwhile (``storage/mapping.py``):
a mapped file truncated under the reader would raise SIGBUS.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

from ckptkit.errors import CorruptCheckpointError, StorageError
from ckptkit.storage.names import UnsafeNameError, check_member_name

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | _CLOEXEC
_CHUNK = 16 << 20
# Sanity caps for files whose size nothing records (manifests, HF JSON files).
MAX_JSON = 64 << 20


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words (never its target or size)."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def not_confined(url: str, mode: int, folder: str | None = None) -> CorruptCheckpointError:
    """The refusal of a member (or of ``folder``, a folder on the way to it) that is not
    a regular file (a real folder): it names the thing and what it is, nothing more."""
    if folder is None:
        return CorruptCheckpointError(
            f"{url} is {kind_of(mode)}, not a regular file: ckptkit never reads through "
            "links, FIFOs or devices in a run (replace it with the real file, or re-save)"
        )
    return CorruptCheckpointError(
        f"{url}: {folder} is {kind_of(mode)}, not a folder: ckptkit never reads through "
        "links in a run (replace it with the real folder, or re-save)"
    )


def key_parts(key: str, url: str) -> list[str]:
    """The checked components of ``key`` ("" is the storage root itself: [])."""
    if key == "":
        return []
    try:
        check_member_name(key, allow_subdirs=True)
    except UnsafeNameError as exc:
        raise CorruptCheckpointError(
            f"{url}: {exc}: a checkpoint may only name files inside it"
        ) from None
    return key.split("/")


# How a storage runs one system call on a member's descriptor: a Drive mount passes a
# caller that gives it up when the mount stops answering (storage/drive/_answer.py).
Calls = Callable[[Callable[[], Any]], Any]


class Member:
    """An opened checkpoint file: a regular file of :attr:`size` bytes.

    Local files carry the descriptor (:attr:`fd`) that was checked; remote ones a
    ``fetch`` that downloads at most the recorded size + 1 bytes when first read (so
    that opening, as ``latest()`` does for every file, stays one metadata request).
    :meth:`through` sets how each read (at most 16 MB) and the close of the descriptor
    run, for a mount that can hang midway through a file (Drive). A failing read (EIO)
    is a one-line StorageError naming the file. Close it (or use ``with``).
    """

    def __init__(
        self,
        url: str,
        size: int,
        *,
        fd: int | None = None,
        data: bytes | None = None,
        fetch: Callable[[int], bytes] | None = None,
    ) -> None:
        self.url = url
        self.size = size
        self.fd = fd
        self._data = data
        self._fetch = fetch
        self._calls: Calls | None = None

    def through(self, calls: Calls) -> Member:
        """This member, its descriptor's calls run by ``calls`` from now on."""
        self._calls = calls
        return self

    def _os(self, fn: Callable[..., Any], *args: Any) -> Any:
        """One system call on the descriptor (see :meth:`through`)."""
        try:
            return fn(*args) if self._calls is None else self._calls(lambda: fn(*args))
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise  # already one line (a Drive mount that does not answer)
            raise StorageError(f"{self.url}: {exc.strerror or exc}") from exc

    def read(self) -> bytes:
        """The whole file: exactly :attr:`size` bytes, never more."""
        if self._data is None and self._fetch is not None:
            data = self._fetch(self.size + 1)  # one byte more tells a file that grew
            check_size(self.url, len(data), self.size, None)
            self._data = data
        if self._data is not None:
            return self._data
        assert self.fd is not None
        parts: list[bytes] = []
        offset = 0
        while offset < self.size:
            block = self._os(os.pread, self.fd, min(_CHUNK, self.size - offset), offset)
            if not block:
                raise CorruptCheckpointError(f"{self.url}: shrank while being read (damaged?)")
            parts.append(block)
            offset += len(block)
        if self._os(os.pread, self.fd, 1, offset):
            raise CorruptCheckpointError(f"{self.url}: grew while being read (still written?)")
        return b"".join(parts)

    def read_range(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes from ``offset``, a range that must lie inside the file
        (an index such as a DCP ``.metadata`` records it); never a byte outside it."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise CorruptCheckpointError(
                f"{self.url}: a recorded byte range lies outside the {self.size}-byte file "
                "(truncated, or an index that does not belong to it)"
            )
        if self.fd is None:
            return self.read()[offset : offset + length]
        parts: list[bytes] = []
        done = 0
        while done < length:
            block = self._os(os.pread, self.fd, min(_CHUNK, length - done), offset + done)
            if not block:
                raise CorruptCheckpointError(f"{self.url}: shrank while being read (damaged?)")
            parts.append(block)
            done += len(block)
        return b"".join(parts)

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes at ``offset`` (a range inside the file), straight
        from the descriptor into the caller's memory (e.g. a fresh tensor's); a file
        that shrank meanwhile raises CorruptCheckpointError, never a partial buffer."""
        length = len(buf)
        if offset < 0 or offset + length > self.size:
            raise CorruptCheckpointError(
                f"{self.url}: a recorded byte range lies outside the {self.size}-byte file "
                "(truncated, or an index that does not belong to it)"
            )
        if self.fd is None:
            buf[:] = self.read()[offset : offset + length]
            return
        done = 0
        while done < length:
            piece = buf[done : done + _CHUNK]
            if hasattr(os, "preadv"):
                got = self._os(os.preadv, self.fd, [piece], offset + done)
            else:  # no preadv (some BSDs): one copy through bytes
                block = self._os(os.pread, self.fd, len(piece), offset + done)
                piece[: len(block)] = block
                got = len(block)
            if not got:
                raise CorruptCheckpointError(f"{self.url}: shrank while being read (damaged?)")
            done += got

    def head(self, n: int) -> bytes:
        """The first ``n`` bytes (fewer for a shorter file)."""
        if self.fd is None:
            return self.read()[:n]
        return self._os(os.pread, self.fd, min(n, self.size), 0)

    def file(self) -> BinaryIO:
        """This file as a read-only binary file object whose reads are this member's
        (confined to its size, bounded where the storage bounds them): what readers
        that take a file get, such as ``safe_torch_load`` (multi-GB files are read
        straight into their tensors, not into one buffer first). It does not own the
        descriptor."""
        return io.BufferedReader(_MemberFile(self), buffer_size=1 << 20)

    def close(self) -> None:
        """Close the descriptor. On a mount that has stopped answering the close is
        given up and the descriptor left to the stuck call (a close on FUSE waits for
        the daemon's flush): the error that stopped the read is the one raised."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                self._os(os.close, fd)
            except StorageError:
                if self._calls is None:
                    raise

    def __enter__(self) -> Member:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _MemberFile(io.RawIOBase):
    """A :class:`Member` read as a seekable file (see :meth:`Member.file`)."""

    def __init__(self, member: Member) -> None:
        self._member = member
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._member.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self._member.size - self._pos))
        if n:
            self._member.readinto(self._pos, memoryview(buffer).cast("B")[:n])
            self._pos += n
        return n


def check_size(url: str, actual: int, size: int | None, max_size: int | None) -> None:
    """Refuse a file whose size is not the recorded one (or above ``max_size``); the
    message quotes only the recorded limit, never the actual size."""
    if size is not None and actual != size:
        raise CorruptCheckpointError(
            f"{url}: its size differs from the {size} bytes the manifest records "
            "(truncated, damaged or replaced)"
        )
    if max_size is not None and actual > max_size:
        raise CorruptCheckpointError(f"{url}: larger than the {max_size} bytes allowed for it")


def from_bytes(url: str, data: bytes, size: int | None, max_size: int | None) -> Member:
    """A member of a remote store, fetched with at most ``limit + 1`` bytes."""
    check_size(url, len(data), size, max_size)
    return Member(url, len(data), data=data)


# -- local filesystems --------------------------------------------------------------
def open_dir(root: str, parts: Sequence[str], url: str) -> int:
    """A descriptor of ``root/parts...``, each component opened without following links.
    Raises FileNotFoundError when one is missing, CorruptCheckpointError when one is a
    link or not a directory."""
    fd = os.open(root, DIR_FLAGS & ~os.O_NOFOLLOW)  # the root was resolved on opening
    try:
        for i, part in enumerate(parts):
            try:
                sub = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                mode = os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode
                raise not_confined(url, mode, "/".join(parts[: i + 1])) from None
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_local(
    root: str, key: str, *, url: str, size: int | None = None, max_size: int | None = None
) -> Member:
    """Open ``key`` below the resolved directory ``root`` (``key=""``: ``root`` itself,
    e.g. a legacy file the user named), confined as the module docstring says."""
    parts = key_parts(key, url)
    if not parts:
        parent, name, dir_fd = os.path.dirname(root), os.path.basename(root), None
    else:
        parent, name = root, parts[-1]
    try:
        if parts:
            dir_fd = open_dir(parent, parts[:-1], url)
        try:
            # Refuse FIFOs and devices before opening them (opening can have effects);
            # the fstat below is what decides.
            mode = os.stat(name if parts else root, dir_fd=dir_fd, follow_symlinks=False).st_mode
            if not stat.S_ISREG(mode):
                raise not_confined(url, mode)
            fd = os.open(name if parts else root, FILE_FLAGS, dir_fd=dir_fd)
        finally:
            if dir_fd is not None:
                os.close(dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise not_confined(url, stat.S_IFLNK) from None
        if isinstance(exc, FileNotFoundError) or exc.errno == errno.ENOTDIR:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), url) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise not_confined(url, st.st_mode)
        check_size(url, st.st_size, size, max_size)
    except BaseException:
        os.close(fd)
        raise
    return Member(url, st.st_size, fd=fd)


def open_member(
    storage: Any, key: str, *, size: int | None = None, max_size: int | None = None
) -> Member:
    """Open ``key`` of ``storage`` through its confined opener (see the module docstring).

    ``size`` is what the manifest records (a different size is corrupt); ``max_size``
    caps files without a recorded size. Raises FileNotFoundError when ``key`` is
    missing, CorruptCheckpointError when it is not a regular file inside the storage.
    """
    opener = getattr(storage, "open_member", None)
    if opener is not None:
        return opener(key, size=size, max_size=max_size)
    # A third-party storage without an opener: links cannot be refused, but sizes can.
    url = storage.url_of(key)
    key_parts(key, url)
    return from_bytes(url, storage.read_bytes(key), size, max_size)


def read_member(
    storage: Any, key: str, *, size: int | None = None, max_size: int | None = None
) -> bytes:
    """The bytes of ``key``, opened with :func:`open_member`."""
    with open_member(storage, key, size=size, max_size=max_size) as member:
        return member.read()
