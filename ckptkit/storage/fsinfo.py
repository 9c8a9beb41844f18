"""What kind of filesystem a descriptor is on (``fstatfs``), for the two fast paths that
are only safe on a local disk: mapping a file for restore (``mapping.py``) and writing
around the page cache (``direct.py``)."""

from __future__ import annotations

import ctypes
import sys
from typing import Any

# fstatfs f_type magic numbers (linux/magic.h).
EXT = 0xEF53  # ext2/3/4
XFS = 0x58465342
BTRFS = 0x9123683E
TMPFS = 0x01021994
ZFS = 0x2FC12FC1
F2FS = 0xF2F52010
# Filesystems whose files change only through this kernel's VFS, and where an unlinked
# file that is still open simply lives on unnamed (FUSE and NFS rename it to a hidden
# name in its folder instead, which would then not be empty).
LOCAL_DISKS = frozenset({EXT, XFS, BTRFS, TMPFS, ZFS, F2FS})


class _StatFs(ctypes.Structure):
    # Only f_type is read; the rest of struct statfs (120 bytes on 64-bit Linux) is room.
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 256)]


_LIBC: list[Any] = []


def _libc() -> Any:
    if not _LIBC:
        try:
            # The running interpreter's own symbols include libc's (no ldconfig lookup).
            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


def fs_type(fd: int) -> int | None:
    """The ``f_type`` of the filesystem ``fd`` lies on; None off Linux or on error."""
    if not sys.platform.startswith("linux"):
        return None
    libc = _libc()
    if libc is None:
        return None
    buf = _StatFs()
    if libc.fstatfs(fd, ctypes.byref(buf)) != 0:
        return None
    return buf.f_type & 0xFFFFFFFF
