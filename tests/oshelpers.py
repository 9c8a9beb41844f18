"""Operating-system fixtures shared by the tests: a small tmpfs of their own, a FUSE
mount that stops answering (as a hung Drive does), and a function run in a forked child
that reports back as JSON."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import mmap
import os
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


@contextlib.contextmanager
def mounted_tmpfs(mnt: Path | str, options: str) -> Iterator[str]:
    """A tmpfs mounted at ``mnt`` with ``options`` (``size=1m,nr_inodes=64``), lazily
    unmounted afterwards; the test skips where mounting is not allowed."""
    Path(mnt).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def in_fork(child: Callable[[], Any]) -> Any:
    """Run ``child`` in a forked process and return what it returned (JSON); assert that
    it exited cleanly. The child never returns into the test (``os._exit``)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.write(w, json.dumps(child()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"the child ended {status}"
    return json.loads(b"".join(chunks))


_FUSE_INIT = 26
_FUSE_NO_REPLY = {2, 36, 42}  # FORGET, INTERRUPT, BATCH_FORGET: answered by no one
_FUSE_DESTROY = 38


class _HungFuse:
    """The daemon of a FUSE mount that answers the kernel's handshake and then nothing:
    every system call on the mount blocks in the kernel, as on a Drive whose FUSE
    daemon hangs. ``release()`` fails every call held so far and any later one (EIO),
    then unmounts, so the threads stuck on it end.

    The daemon is a forked child, not a thread of the test: a call that blocks on the
    mount while holding the GIL (a C extension opening a file) would otherwise stop the
    daemon that should answer it. It stops when released, or when the test process is
    gone (its control pipe closes)."""

    def __init__(self, mnt: str) -> None:
        self.mnt = mnt
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open("/dev/fuse", os.O_RDWR)
        options = f"fd={fd},rootmode=40000,user_id=0,group_id=0".encode()
        if self._libc.mount(b"ckptkit-hung", mnt.encode(), b"fuse", 0, options) != 0:
            code = ctypes.get_errno()
            os.close(fd)
            raise OSError(code, os.strerror(code))
        self._released = False
        self._mutex = threading.Lock()
        # What the daemon tells the test: a count of reads served and its own errors.
        self._shared = mmap.mmap(-1, 1 << 16)
        ctl_r, self._ctl = os.pipe()
        self._ack, ack_w = os.pipe()
        self._pid = os.fork()
        if self._pid == 0:  # the daemon
            code = 0
            try:
                os.close(self._ctl)
                os.close(self._ack)
                self._fd, self._ctl_in, self._ack_out = fd, ctl_r, ack_w
                self._daemon()
            except BaseException:  # noqa: BLE001 - a daemon never returns into the test
                code = 1
            finally:
                os._exit(code)
        os.close(fd)  # the daemon's alone: its exit ends the connection
        os.close(ctl_r)
        os.close(ack_w)

    # -- in the test's process -----------------------------------------------------
    def _command(self, message: dict[str, Any]) -> None:
        """Send the daemon ``message`` and wait until it has taken it."""
        with self._mutex:
            if self._released:
                return
            os.write(self._ctl, json.dumps(message).encode() + b"\n")
            os.read(self._ack, 1)

    @property
    def reads(self) -> int:
        """READ requests the daemon answered."""
        return int(struct.unpack_from("<Q", self._shared, 0)[0])

    @property
    def errors(self) -> list[str]:
        """The daemon's own failures (a bug in it, not in what it serves)."""
        n = struct.unpack_from("<I", self._shared, 8)[0]
        text = bytes(self._shared[12 : 12 + n]).decode()
        return [line for line in text.split("\n") if line]

    def release(self) -> None:
        with self._mutex:
            if self._released:
                return  # released already (by the test, or by its watchdog)
            self._released = True
            with contextlib.suppress(OSError):
                os.write(self._ctl, b'{"release": true}\n')
            os.close(self._ctl)
        self._libc.umount2(self.mnt.encode(), 2)  # MNT_DETACH
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self._pid, 0)
        os.close(self._ack)

    # -- in the daemon -------------------------------------------------------------
    def _reply(self, unique: int, error: int, body: bytes = b"") -> None:
        with contextlib.suppress(OSError):
            os.write(self._fd, struct.pack("<IiQ", 16 + len(body), error, unique) + body)

    def _note_error(self, text: str) -> None:
        n = struct.unpack_from("<I", self._shared, 8)[0]
        raw = (text + "\n").encode()[: len(self._shared) - 12 - n]
        self._shared[12 + n : 12 + n + len(raw)] = raw
        struct.pack_into("<I", self._shared, 8, n + len(raw))

    def _control(self, message: dict[str, Any]) -> None:
        """A command from the test (the serving daemon adds its own)."""

    def _answer(self, opcode: int, node: int, body: bytes) -> tuple[int, bytes] | None:
        """(error, reply body) for one request, or None to hold it: this one holds all."""
        return None

    def _daemon(self) -> None:
        import select

        held: list[int] = []
        pending = b""
        while True:
            ready, _, _ = select.select([self._fd, self._ctl_in], [], [])
            if self._ctl_in in ready:
                chunk = os.read(self._ctl_in, 65536)
                pending += chunk
                lines = pending.split(b"\n")
                pending = lines.pop()
                for line in lines:
                    message = json.loads(line)
                    if message.get("release"):
                        chunk = b""
                        break
                    self._control(message)
                    os.write(self._ack_out, b"k")
                if not chunk:  # released, or the test process is gone
                    for unique in held:
                        self._reply(unique, -errno.EIO)
                    return  # exiting closes the device: every later call fails at once
                continue
            try:
                request = os.read(self._fd, 1 << 21)
            except OSError:
                return
            _, opcode, unique, node = struct.unpack_from("<IIQQ", request, 0)
            if opcode == _FUSE_INIT:  # protocol 7.31, the kernel's readahead
                readahead = struct.unpack_from("<IIII", request, 40)[2]
                body = struct.pack(
                    "<IIIIHHIIHHI7I", 7, 31, readahead, 0, 16, 12, 1 << 17, 1, 32, 0, 0,
                    *[0] * 7,
                )  # fmt: skip
                self._reply(unique, 0, body)
                continue
            if opcode in _FUSE_NO_REPLY or opcode == _FUSE_DESTROY:
                continue
            if held:  # hung already: everything waits
                held.append(unique)
                continue
            try:
                answer = self._answer(opcode, node, request[40:])
            except OSError as exc:
                answer = (-(exc.errno or errno.EIO), b"")
            except Exception as exc:  # a bug here must fail the call, not hang it
                self._note_error(f"opcode {opcode}: {exc!r}")
                answer = (-errno.EIO, b"")
            if answer is None:
                held.append(unique)
            else:
                self._reply(unique, *answer)


@contextlib.contextmanager
def hung_fuse(mnt: Path | str, *, release_after: float = 90.0) -> Iterator[_HungFuse]:
    """Mount a FUSE filesystem that never answers over ``mnt`` (an existing folder,
    whose contents it hides until released); the test skips where FUSE mounts are not
    allowed (no /dev/fuse, no CAP_SYS_ADMIN). A watchdog releases it after
    ``release_after`` seconds whatever the test does: code that hangs on it (the bug
    under test) would otherwise block the test process in the kernel for good, where no
    timeout signal reaches it."""
    with _watched(lambda: _HungFuse(str(mnt)), release_after) as fuse:
        yield fuse


@contextlib.contextmanager
def _watched(mount: Callable[[], Any], release_after: float) -> Iterator[Any]:
    """The daemon ``mount()`` starts, released on leaving or after ``release_after``
    seconds, whichever comes first; the test skips where FUSE cannot be mounted."""
    try:
        fuse = mount()
    except OSError as exc:
        pytest.skip(f"cannot mount FUSE here: {exc}")
    watchdog = threading.Timer(release_after, fuse.release)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield fuse
    finally:
        watchdog.cancel()
        fuse.release()


# FUSE opcodes (linux/fuse.h) the serving daemon answers; anything else gets ENOSYS.
_LOOKUP, _GETATTR, _SETATTR, _MKDIR, _UNLINK, _RMDIR, _RENAME = 1, 3, 4, 9, 10, 11, 12
_OPEN, _READ, _WRITE, _STATFS, _RELEASE, _FSYNC, _FLUSH = 14, 15, 16, 17, 18, 20, 25
_OPENDIR, _READDIR, _RELEASEDIR, _FSYNCDIR, _ACCESS, _CREATE = 27, 28, 29, 30, 34, 35
_FOPEN_DIRECT_IO = 1  # every read reaches the daemon: none is served from the page cache
_FATTR_MODE, _FATTR_SIZE = 1, 8


class _ServingFuse(_HungFuse):
    """A FUSE daemon passing the folder ``src`` through to ``mnt`` (files and folders:
    look up, read, create, write, truncate, rename, remove, sync), until
    :meth:`hang_reads` makes it stop answering midway through reading a file (a Drive
    daemon that hangs while a large file is read): from then on it holds every request,
    as :class:`_HungFuse` does. ``release()`` fails them (EIO) and unmounts."""

    def __init__(self, src: str, mnt: str) -> None:
        self.src = src
        self._paths: dict[int, str] = {1: src}
        self._ids: dict[str, int] = {src: 1}
        self._hang: tuple[str, int] | None = None
        self._served: dict[str, int] = {}
        self._open: dict[int, str] = {}  # fh (the daemon's own descriptor) -> path
        super().__init__(mnt)

    def hang_reads(self, suffix: str, after: int) -> None:
        """Serve ``after`` bytes of each file whose name ends with ``suffix``, then stop
        answering everything."""
        self._command({"hang": [suffix, after]})

    def _control(self, message: dict[str, Any]) -> None:
        if "hang" in message:
            self._hang = (message["hang"][0], int(message["hang"][1]))

    def _node(self, path: str) -> int:
        if path not in self._ids:
            self._ids[path] = len(self._paths) + 1
            self._paths[self._ids[path]] = path
        return self._ids[path]

    def _entry(self, path: str) -> bytes:
        node = self._node(path)
        return struct.pack("<QQQQII", node, 0, 0, 0, 0, 0) + self._attr(os.lstat(path), node)

    @staticmethod
    def _attr(st: os.stat_result, node: int) -> bytes:
        return struct.pack(
            "<QQQQQQIIIIIIIIII", node, st.st_size, (st.st_size + 511) // 512,
            int(st.st_atime), int(st.st_mtime), int(st.st_ctime), 0, 0, 0,
            st.st_mode, st.st_nlink, st.st_uid, st.st_gid, 0, 4096, 0,
        )  # fmt: skip

    @staticmethod
    def _name(body: bytes, skip: int = 0) -> str:
        return body[skip:].split(b"\0", 1)[0].decode()

    def _answer(self, opcode: int, node: int, body: bytes) -> tuple[int, bytes] | None:
        """(error, reply body) for one request; None to hold it (hung)."""
        path = self._paths.get(node, self.src)
        if opcode == _LOOKUP:
            return 0, self._entry(os.path.join(path, self._name(body)))
        if opcode == _GETATTR:
            return 0, struct.pack("<QII", 0, 0, 0) + self._attr(os.lstat(path), node)
        if opcode == _SETATTR:
            valid, _, fh, size = struct.unpack_from("<IIQQ", body, 0)
            if valid & _FATTR_SIZE:
                os.truncate(path, size)
            if valid & _FATTR_MODE:
                os.chmod(path, struct.unpack_from("<I", body, 76)[0] & 0o7777)
            return 0, struct.pack("<QII", 0, 0, 0) + self._attr(os.lstat(path), node)
        if opcode in (_OPEN, _CREATE):
            flags = struct.unpack_from("<I", body, 0)[0] & ~(os.O_CREAT | os.O_EXCL)
            flags &= os.O_ACCMODE | os.O_APPEND | os.O_TRUNC
            if opcode == _CREATE:  # fuse_create_in: flags, mode, umask, open_flags; name
                mode = struct.unpack_from("<I", body, 4)[0]
                path = os.path.join(path, self._name(body, 16))
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, mode & 0o7777)
            else:
                fd = os.open(path, flags)
            self._open[fd] = path
            out = struct.pack("<QII", fd, _FOPEN_DIRECT_IO, 0)
            return 0, (self._entry(path) + out) if opcode == _CREATE else out
        if opcode == _READ:
            fh, offset, size = struct.unpack_from("<QQI", body, 0)
            hang = self._hang
            if hang is not None and path.endswith(hang[0]):
                if self._served.get(path, 0) >= hang[1]:
                    return None
                self._served[path] = self._served.get(path, 0) + size
            struct.pack_into("<Q", self._shared, 0, self.reads + 1)
            return 0, os.pread(fh, size, offset)
        if opcode == _WRITE:
            fh, offset, size = struct.unpack_from("<QQI", body, 0)
            written = os.pwrite(fh, body[40 : 40 + size], offset)
            return 0, struct.pack("<II", written, 0)
        if opcode == _RELEASE:
            fh = struct.unpack_from("<Q", body, 0)[0]
            if self._open.pop(fh, None) is not None:
                os.close(fh)
            return 0, b""
        if opcode == _FSYNC:
            os.fsync(struct.unpack_from("<Q", body, 0)[0])
            return 0, b""
        if opcode == _MKDIR:
            child = os.path.join(path, self._name(body, 8))
            os.mkdir(child, struct.unpack_from("<I", body, 0)[0] & 0o7777)
            return 0, self._entry(child)
        if opcode in (_UNLINK, _RMDIR):
            (os.unlink if opcode == _UNLINK else os.rmdir)(os.path.join(path, self._name(body)))
            return 0, b""
        if opcode == _RENAME:
            new_dir = self._paths[struct.unpack_from("<Q", body, 0)[0]]
            old, new = body[8:].split(b"\0")[:2]
            src, dst = os.path.join(path, old.decode()), os.path.join(new_dir, new.decode())
            os.rename(src, dst)
            for known, n in list(self._ids.items()):  # the nodes below move with it
                if known == src or known.startswith(src + "/"):
                    moved = dst + known[len(src) :]
                    self._ids[moved], self._paths[n] = n, moved
                    del self._ids[known]
            return 0, b""
        if opcode == _READDIR:
            _, offset, size = struct.unpack_from("<QQI", body, 0)
            out = b""
            names = [".", "..", *sorted(os.listdir(path))]
            for i, name in enumerate(names[offset:], start=offset + 1):
                raw = name.encode()
                entry = struct.pack("<QQII", node, i, len(raw), 0) + raw
                entry += b"\0" * (-len(entry) % 8)
                if len(out) + len(entry) > size:
                    break
                out += entry
            return 0, out
        if opcode == _STATFS:
            return 0, struct.pack("<QQQQQIIII6I", 1 << 20, 1 << 19, 1 << 19, 1000, 500,
                                  4096, 255, 4096, 0, *[0] * 6)  # fmt: skip
        if opcode in (_OPENDIR, _RELEASEDIR, _FLUSH, _ACCESS, _FSYNCDIR):
            return 0, struct.pack("<QII", 0, 0, 0) if opcode == _OPENDIR else b""
        return -errno.ENOSYS, b""


@contextlib.contextmanager
def serving_fuse(
    src: Path | str, mnt: Path | str, *, release_after: float = 90.0
) -> Iterator[_ServingFuse]:
    """Pass the folder ``src`` through to ``mnt`` with a FUSE daemon that can be made to
    hang midway through a file (:meth:`_ServingFuse.hang_reads`); a watchdog releases it
    after ``release_after`` seconds, as :func:`hung_fuse` does. The test skips where FUSE
    mounts are not allowed."""
    with _watched(lambda: _ServingFuse(str(src), str(mnt)), release_after) as fuse:
        yield fuse
