"""Operating-system fixtures shared by the tests: a small tmpfs of their own, a FUSE
mount that stops answering (as a hung Drive does), and a function run in a forked child
that reports back as JSON."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
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


class _HungFuse:
    """The daemon of a FUSE mount that answers the kernel's handshake and then nothing:
    every system call on the mount blocks in the kernel, as on a Drive whose FUSE
    daemon hangs. ``release()`` fails every call held so far and any later one (EIO),
    then unmounts, so the threads stuck on it end."""

    def __init__(self, mnt: str) -> None:
        self.mnt = mnt
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = os.open("/dev/fuse", os.O_RDWR)
        options = f"fd={self._fd},rootmode=40000,user_id=0,group_id=0".encode()
        if self._libc.mount(b"ckptkit-hung", mnt.encode(), b"fuse", 0, options) != 0:
            code = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(code, os.strerror(code))
        self._held: list[int] = []
        self._lock = threading.Lock()
        self._failing = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _reply(self, unique: int, error: int, body: bytes = b"") -> None:
        with contextlib.suppress(OSError):
            os.write(self._fd, struct.pack("<IiQ", 16 + len(body), error, unique) + body)

    def _serve(self) -> None:
        while True:
            try:
                request = os.read(self._fd, 1 << 20)
            except OSError:
                return
            _, opcode, unique = struct.unpack_from("<IIQ", request, 0)
            if opcode == _FUSE_INIT:  # protocol 7.31, the kernel's readahead
                readahead = struct.unpack_from("<IIII", request, 40)[2]
                body = struct.pack(
                    "<IIIIHHIIHHI7I", 7, 31, readahead, 0, 16, 12, 1 << 17, 1, 32, 0, 0,
                    *[0] * 7,
                )  # fmt: skip
                self._reply(unique, 0, body)
            elif opcode not in _FUSE_NO_REPLY:
                with self._lock:
                    if self._failing:
                        self._reply(unique, -errno.EIO)
                    else:
                        self._held.append(unique)

    def release(self) -> None:
        with self._lock:
            if self._failing:
                return  # released already (by the test, or by its watchdog)
            self._failing = True
            for unique in self._held:
                self._reply(unique, -errno.EIO)
            self._held.clear()
        self._libc.umount2(self.mnt.encode(), 2)  # MNT_DETACH


@contextlib.contextmanager
def hung_fuse(mnt: Path | str, *, release_after: float = 90.0) -> Iterator[_HungFuse]:
    """Mount a FUSE filesystem that never answers over ``mnt`` (an existing folder,
    whose contents it hides until released); the test skips where FUSE mounts are not
    allowed (no /dev/fuse, no CAP_SYS_ADMIN). A watchdog releases it after
    ``release_after`` seconds whatever the test does: code that hangs on it (the bug
    under test) would otherwise block the test process in the kernel for good, where no
    timeout signal reaches it."""
    try:
        fuse = _HungFuse(str(mnt))
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
