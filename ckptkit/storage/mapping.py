"""Checkpoint files mapped into memory for one restore, so that a model's weights are
copied once, straight from the file's pages into the parameters (docs/FORMAT.md,
"Restore speed").

A mapped file that shrinks under the mapping raises SIGBUS on the next access, which
Python cannot turn into an exception: the process dies. So a file is mapped only where
nothing can change it while it is mapped, and read with ``pread`` otherwise:

- on Linux, on a local disk filesystem recognised by ``fstatfs`` (ext2/3/4, xfs, btrfs,
  tmpfs, zfs, f2fs). Never on FUSE (a Drive mount), NFS, SMB/CIFS, 9p or overlayfs:
  their files can change behind the kernel's back (the other machine, the Drive
  daemon, the layer below);
- under a read lease (``fcntl(F_SETLEASE, F_RDLCK)``). The kernel grants it only while
  nobody has the file open for writing, and from then on makes every open-for-write or
  truncate of it (ours included) wait until the lease is released, for up to
  ``/proc/sys/fs/lease-break-time`` (45 s by default). A restore reads in well under
  that, and it looks at the lease between pieces: a pending break makes it give the
  mapping up and read that file again with ``pread``, where a file that changes is a
  short read or a hash mismatch, i.e. a CorruptCheckpointError. The kernel announces a
  break with a signal; it is set to SIGURG, which is ignored unless a program asks for
  it, so that nothing is killed by the default SIGIO;
- the size is checked with ``fstat`` after the lease is taken (a truncation between
  open and lease), and a file of the wrong size is corrupt.

The mapping is private and writable (copy-on-write): a caller that writes into a view
changes only its own copy of the page, never the file, and never faults on a read-only
page. A lease needs the file to be ours (or CAP_LEASE); where it is refused, the file is
simply read the other way.
"""

from __future__ import annotations

import atexit
import contextlib
import mmap
import os
import signal
import sys
from collections.abc import Iterable

import torch

from ckptkit.errors import CorruptCheckpointError
from ckptkit.storage import fsinfo

try:
    import fcntl
except ImportError:  # Windows: no leases, so nothing is mapped
    fcntl = None  # type: ignore[assignment]

# linux/fcntl.h (F_SETSIG is not exported by Python's fcntl module).
_F_SETSIG = 10
_F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
_F_GETLEASE = getattr(fcntl, "F_GETLEASE", 1025)
_F_RDLCK = getattr(fcntl, "F_RDLCK", 0)
_F_UNLCK = getattr(fcntl, "F_UNLCK", 2)
_MADV_POPULATE_READ = 22  # Linux 5.14+: prefault the pages for reading, one call
# Bytes hashed between two looks at the lease (a break is noticed within one piece).
PIECE = 16 << 20


def mappable_here(fd: int) -> bool:
    """Whether the file behind ``fd`` lies on a filesystem where a read lease keeps it
    unchanged (see the module docstring)."""
    return (
        sys.platform.startswith("linux")
        and fcntl is not None
        and fsinfo.fs_type(fd) in fsinfo.LOCAL_DISKS
    )


class MappedFile:
    """One checkpoint file mapped under a read lease: :attr:`view` (its bytes) and
    :meth:`tensor` (a view of a range as a tensor, no copy)."""

    def __init__(self, fd: int, size: int, url: str) -> None:
        self.url = url
        self.size = size
        self._fd = fd
        self._map = mmap.mmap(
            fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
        with contextlib.suppress(OSError, ValueError):  # an older kernel: faulted lazily
            self._map.madvise(_MADV_POPULATE_READ)
        self.view: memoryview | None = memoryview(self._map)
        self._bytes: torch.Tensor | None = torch.frombuffer(self._map, dtype=torch.uint8)
        self.start = self._bytes.data_ptr()
        self.end = self.start + size

    def intact(self) -> bool:
        """Whether the lease still holds (no one waits to write or truncate the file)."""
        try:
            return fcntl.fcntl(self._fd, _F_GETLEASE) == _F_RDLCK
        except OSError:
            return False

    def tensor(
        self, offset: int, nbytes: int, dtype: torch.dtype, shape: list[int]
    ) -> torch.Tensor:
        """The bytes at ``offset`` as a tensor of ``dtype`` and ``shape``: a view of the
        mapping when aligned for ``dtype`` (a copy otherwise, or when empty)."""
        assert self._bytes is not None
        if nbytes and offset % dtype.itemsize == 0:
            return self._bytes[offset : offset + nbytes].view(dtype).reshape(shape)
        out = torch.empty(shape, dtype=dtype)
        if nbytes:
            out.reshape(-1).view(torch.uint8).copy_(self._bytes[offset : offset + nbytes])
        return out

    def owns(self, t: torch.Tensor) -> bool:
        ptr = t.untyped_storage().data_ptr()
        return self.start <= ptr < self.end

    def close(self) -> bool:
        """Unmap and release the lease; False (still mapped, lease held) while a view of
        it is alive somewhere, to be retried later."""
        if self._map is None:
            return True
        self._bytes = None
        if self.view is not None:
            with contextlib.suppress(BufferError):
                self.view.release()
                self.view = None
        try:
            self._map.close()
        except BufferError:
            return False
        self._map = None  # type: ignore[assignment]
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._fd, _F_SETLEASE, _F_UNLCK)
        os.close(self._fd)
        return True


def map_file(fd: int, size: int, url: str) -> MappedFile | None:
    """``fd`` (a confined, checked descriptor of ``size`` bytes) mapped under a read
    lease, or None where that is not safe or not granted (read it with ``pread``)."""
    if size == 0 or not mappable_here(fd):
        return None
    own = os.dup(fd)
    try:
        fcntl.fcntl(own, _F_SETSIG, signal.SIGURG)
        fcntl.fcntl(own, _F_SETLEASE, _F_RDLCK)
    except OSError:  # open for writing somewhere, not our file, or no leases here
        os.close(own)
        return None
    try:
        if os.fstat(own).st_size != size:  # changed between the open and the lease
            raise CorruptCheckpointError(
                f"{url}: its size differs from the {size} bytes the manifest records "
                "(truncated, damaged or replaced)"
            )
        return MappedFile(own, size, url)
    except BaseException:
        with contextlib.suppress(OSError):
            fcntl.fcntl(own, _F_SETLEASE, _F_UNLCK)
        os.close(own)
        raise


class LeaseBroken(Exception):
    """Someone wants to write or truncate a mapped file: read it another way."""


# Mappings a finished restore could not close yet (a view still referenced, e.g. by a
# traceback): closed by a later restore, or when the process exits.
_UNCLOSED: list[MappedFile] = []


class Lending:
    """The files mapped for one restore, lent as views to the models and optimizers
    named ``keys`` and closed after it. A model's ``load_state_dict`` copies the views
    into its parameters; an optimizer would keep them, so ``adopt`` first copies each
    into the tensor the optimizer holds now for the same slot (no new memory: fresh
    tensors for 2/3 of an AdamW state cost a page fault per 4 KiB, which measured
    slower than reading the bytes), or into a clone."""

    def __init__(self, keys: Iterable[str]) -> None:
        self.keys = set(keys)
        self.files: list[MappedFile] = []

    def map(self, fd: int | None, size: int, url: str) -> MappedFile | None:
        if fd is None:
            return None
        mapped = map_file(fd, size, url)
        if mapped is not None:
            self.files.append(mapped)
        return mapped

    def drop(self, mapped: MappedFile) -> None:
        """Give one mapping up early (its lease is being broken)."""
        if mapped in self.files:
            self.files.remove(mapped)
            if not mapped.close():
                _UNCLOSED.append(mapped)

    def still_valid(self, key: str) -> str | None:
        """Why the views lent to ``key`` must not be touched any more, or None. Asked
        right before a model copies them: if anyone has waited to write or truncate a
        mapped file since (user code run meanwhile, in this very thread even: the
        kernel revokes the lease after lease-break-time and lets the truncate through),
        touching its pages could raise SIGBUS, so the restore stops instead."""
        if key in self.keys and not all(f.intact() for f in self.files):
            return (
                "a checkpoint file was opened for writing or truncated while it was being "
                "restored: restore again once nothing writes to the run"
            )
        return None

    def adopt(self, key: str, target: object, value: object) -> object:
        """``value`` (the state ``target`` is about to load) with no tensor left in a
        mapping, for an optimizer (anything else as it is): each mapped tensor is copied
        into the optimizer's current tensor of the same parameter and name where shape,
        dtype and layout match (so it loads its own memory back), else cloned. Called
        right before ``load_state_dict``, after every check, like the model's copy."""
        if key not in self.keys or not self.files or not isinstance(target, torch.optim.Optimizer):
            return value
        current = {"state": target.state_dict().get("state", {})}
        taken: set[int] = set()

        def own(v: object, cur: object) -> object:
            if isinstance(v, torch.Tensor):
                if not any(f.owns(v) for f in self.files):
                    return v
                if _fits(cur, v) and cur.data_ptr() not in taken:  # type: ignore[union-attr]
                    assert isinstance(cur, torch.Tensor)
                    taken.add(cur.data_ptr())
                    with torch.no_grad():
                        cur.copy_(v)
                    return cur
                return v.clone()
            if isinstance(v, dict):
                mine = cur if isinstance(cur, dict) else {}
                return {k: own(x, mine.get(k)) for k, x in v.items()}
            if isinstance(v, (list, tuple)):  # the decoder makes plain ones only
                items = [own(x, None) for x in v]
                return items if isinstance(v, list) else tuple(items)
            return v

        return own(value, current)

    def settle(self, modules: Iterable[torch.nn.Module]) -> None:
        """Give every parameter or buffer of ``modules`` that still points into a
        mapping (a custom ``_load_from_state_dict`` that kept the tensor it was given)
        memory of its own, so that nothing outlives the mapping."""
        if not self.files:
            return
        for module in modules:
            for t in [*module.parameters(), *module.buffers()]:
                if any(f.owns(t) for f in self.files):
                    with torch.no_grad():
                        t.data = t.data.clone()

    def close(self) -> None:
        pending = [f for f in [*_UNCLOSED, *self.files] if not f.close()]
        _UNCLOSED[:] = pending
        self.files = []


def _fits(cur: object, v: torch.Tensor) -> bool:
    """Whether ``v`` can be copied into ``cur`` in place, byte for byte: a plain dense
    CPU tensor of the same shape and dtype, owning its memory alone (not a view into a
    larger storage, which something else may also use)."""
    return (
        type(cur) is torch.Tensor
        and cur.device.type == "cpu"
        and cur.layout == torch.strided
        and cur.dtype == v.dtype
        and cur.shape == v.shape
        and cur.is_contiguous()
        and not cur.requires_grad
        and cur.storage_offset() == 0
        and cur.untyped_storage().nbytes() == cur.numel() * cur.element_size()
    )


@atexit.register
def _close_at_exit() -> None:
    for f in _UNCLOSED:
        with contextlib.suppress(Exception):
            f.close()
