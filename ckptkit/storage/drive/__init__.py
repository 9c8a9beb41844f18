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
holds the marker file ``.ckptkit-drive-root`` with the token the staging folder
recorded when the root was first seen (and, under ``/content/drive`` or another
mount point, while that is still a mount point). Every Drive write checks it before
and after, a staged copy is removed only once verified on the live mount, and
``save()``/``flush()``/``close()`` raise :class:`~ckptkit.errors.StorageError` while it
is gone. The next writer after a remount replays the staged uploads.

**Reading never replays.** The queue (and with it the adoption of dead sessions) is
started by the first write only: ``ls``, ``inspect``, ``load`` and ``readonly=True``
managers read Drive (and the queue of a writer in the same process), and neither upload
nor delete anything.

One module per job: ``_journal`` (staging sessions and their journals), ``_mount``
(what counts as the live mount; the only code that changes Drive), ``_uploader``
(the queue, its thread, one queue per run and process) and ``_view`` (``DriveStorage``:
the merged read view and the routing of writes). ``DEFAULT_ROOT`` and the file copy
live here, where tests (and only tests) replace them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import stat
import threading
import uuid

DEFAULT_ROOT = "/content/drive/MyDrive"
_CHUNK = 4 << 20


# A copy tells the upload thread that runs it that it moves, block by block: one that
# does not move for CKPTKIT_DRIVE_TIMEOUT seconds hangs on the mount (_uploader).
progress = threading.local()


def _tick() -> None:
    tick = getattr(progress, "tick", None)
    if tick is not None:
        tick()


# -- the file copy: here, so that tests can make Drive fail (drive._copy_file = ...) --
# A copy in progress (or left by a kill): never listed, never read.
PARTIAL = re.compile(r"^\..+\.[0-9a-f]{8}\.part$")


def _copy_file(src: str, dst: str) -> str:
    """Copy ``src`` to ``dst`` (fsynced); return the sha256 of the bytes copied."""
    mkdirs_on_drive(os.path.dirname(dst))
    # Into a fresh sibling, then renamed over ``dst``: a file already live on Drive (a
    # manifest that a replay uploads again) is never truncated in place, so a kill or a
    # lost mount mid-copy leaves either the old file or the new one, whole.
    head, name = os.path.split(dst)
    tmp = os.path.join(head, f".{name}.{uuid.uuid4().hex[:8]}.part")
    h = hashlib.sha256()
    try:
        with open(src, "rb") as fin, os.fdopen(_open_no_follow(tmp), "wb") as fout:
            while block := fin.read(_CHUNK):
                h.update(block)
                fout.write(block)
                _tick()
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dst)  # replaces a link planted at dst, never its target
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return h.hexdigest()


def _open_no_follow(dst: str) -> int:
    """A descriptor of a fresh regular file at ``dst``: a link (or FIFO...) someone left
    there is removed and replaced, never written through (its target stays untouched)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK
    for _ in range(3):
        try:
            fd = os.open(dst, flags, 0o644)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENXIO):
                raise
            os.unlink(dst)
            continue
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
        os.close(fd)
        os.unlink(dst)
    raise OSError(errno.EEXIST, f"{dst} keeps being replaced while written")


def _digest(path: str) -> tuple[int, str]:
    """Size and sha256 of ``path``, read back from the filesystem (never through a link)."""
    h = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        while block := f.read(_CHUNK):
            size += len(block)
            h.update(block)
            _tick()
    return size, h.hexdigest()


from ckptkit.storage.drive._mount import MARKER, mkdirs_on_drive  # noqa: E402
from ckptkit.storage.drive._view import (  # noqa: E402
    ROOT_ENV,
    STAGING_ENV,
    DriveStorage,
    default_staging,
)

__all__ = ["DEFAULT_ROOT", "MARKER", "ROOT_ENV", "STAGING_ENV", "DriveStorage", "default_staging"]
