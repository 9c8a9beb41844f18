"""Freeing a removed file's disk space off the caller's time.

Removing a large file is slow on some disks: the filesystem frees (and, mounted with
``discard`` as cloud VM disks are, trims) every block before ``unlink`` returns. Measured
on these machines (ext4, ``discard``): 0.28 ms per MB, so 200 ms for a 700 MB file, 15-20 %
of the save whose rotation removes the previous checkpoint.

The kernel frees an unlinked file's blocks at its last close, not at the unlink. So a
folder removal (``LocalStorage.delete``) on a local disk filesystem opens each large
regular file before unlinking it (never on FUSE, a Drive mount, or NFS: they keep an
unlinked open file as a hidden entry of its folder, which could then not be removed),
and hands the descriptor to this module's closer thread: the folder is gone when the
call returns, exactly as before (a listing, a reader, an error such as ``EBUSY`` see no
difference), and only the blocks come back a little later. Bounded:

- ``wait()`` returns once every handed-over file is closed: the storage calls it before
  writing a large file (so a save never holds more space than before: the previous
  checkpoint's blocks are free before the next one's are claimed) and in ``flush()`` /
  ``close()``.
- Nothing is left behind by a crash: a killed process's descriptors are closed by the
  kernel, which then frees the blocks.
- A forked child (a DataLoader worker, the async writer) closes its copies of the
  pending descriptors at once, or it would keep the blocks allocated while it lives.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading

from ckptkit.storage import fsinfo

# Files smaller than this are unlinked plainly: their blocks free fast, an open costs.
MIN_SIZE = 1 << 20

_pending: list[int] = []
_lock = threading.Lock()
_idle = threading.Event()
_idle.set()
_running = False


def unlink(name: str, dir_fd: int, size: int, held: list[int]) -> None:
    """Unlink ``name`` (a non-folder entry of ``dir_fd``, never followed); a regular file
    of at least MIN_SIZE bytes is opened first and its descriptor appended to ``held``,
    for ``close_later`` once the whole folder is removed (a close that frees blocks
    while the rest is unlinked would make those unlinks wait for it in the journal)."""
    fd = -1
    if size >= MIN_SIZE and fsinfo.fs_type(dir_fd) in fsinfo.LOCAL_DISKS:
        with contextlib.suppress(OSError):
            # O_NOFOLLOW, O_NONBLOCK: a link or FIFO swapped in is never followed or
            # waited on; only a regular file is kept (checked on the open descriptor).
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
            fd = os.open(name, flags, dir_fd=dir_fd)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                fd = -1
    try:
        os.unlink(name, dir_fd=dir_fd)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    if fd >= 0:
        held.append(fd)


def close_later(fds: list[int]) -> None:
    """Close ``fds`` (unlinked files) on the closer thread: their blocks free there."""
    global _running
    if not fds:
        return
    with _lock:
        _pending.extend(fds)
        _idle.clear()
        if not _running:
            _running = True
            _start()


def _start() -> None:
    # A daemon: at exit the kernel closes (and frees) whatever is left.
    threading.Thread(target=_run, name="ckptkit-free", daemon=True).start()


def _run() -> None:
    global _running
    while True:
        with _lock:
            if not _pending:
                _running = False
                _idle.set()
                return
            # Taken off the list before the close: once closed, its number may be reused,
            # and a child forked meanwhile must never close an unrelated descriptor (a
            # child forked during this close keeps that one file until it exits).
            fd = _pending.pop(0)
        with contextlib.suppress(OSError):
            os.close(fd)  # the last reference: the kernel frees the blocks here


def wait() -> None:
    """Return once every file handed over so far is closed (its space free)."""
    while not _idle.wait(0.2):  # woken often, so that a Ctrl+C is noticed
        pass


def _after_fork_in_child() -> None:
    global _lock, _idle, _running
    for fd in _pending:
        with contextlib.suppress(OSError):
            os.close(fd)  # the parent's reference remains: cheap here
    _pending.clear()
    _lock = threading.Lock()  # a parent thread may have held these at the fork
    _idle = threading.Event()
    _idle.set()
    _running = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
