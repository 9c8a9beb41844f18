"""The storage protocol: what every backend offers, keyed by URL scheme.

A backend is rooted at a URL (``/data/runs/x``, ``gs://bucket/runs/x``) and every
operation takes a *key*: a ``/``-separated path relative to that root. URLs stay
strings end to end (``pathlib.Path("gs://b")`` would collapse the ``//``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ckptkit.errors import StorageError

if TYPE_CHECKING:
    from ckptkit.storage.confined import Member


class WriteLost(StorageError):
    """The store forgot a write in progress (a GCS resumable upload session expired, or
    its server restarted and lost it: 404 on a part). Nothing of it became visible; the
    object can only be written again from its first byte, which the caller may do once
    more (``atomic.strategies.put`` does, from its payload)."""


@runtime_checkable
class Storage(Protocol):
    """What ckptkit needs from a place that holds checkpoints.

    ``commit`` names the atomic commit strategy that suits the backend:
    ``"rename"`` where a directory rename is atomic (local filesystems),
    ``"marker"`` where it is not (object stores, Drive): the manifest is then
    written last and is the commit.

    Optional capabilities, read with ``getattr`` (absent means no): ``parallel_writes``
    (how many files of a checkpoint may be written at once: object stores) and
    ``releases_chunks`` (``write_stream`` is done with each chunk's bytes before it
    asks for the next one, and never asks for a file's chunks twice: an async save
    then streams a tensor from live memory until the loop's next step; read with
    ``releases_chunks()``, which a subclass that overrides ``write_stream`` does not
    inherit).
    """

    url: str
    commit: str

    def child(self, key: str) -> Storage:
        """A storage rooted at ``key`` below this one."""

    def url_of(self, key: str) -> str:
        """The full URL of ``key``, for messages."""

    def open_member(
        self, key: str, *, size: int | None = None, max_size: int | None = None
    ) -> Member:
        """Open ``key`` as a checkpoint file: a regular file inside the storage (no link
        followed below the root), of ``size`` bytes when given, at most ``max_size``;
        reads never return more. The one way checkpoint files are read (see
        :mod:`ckptkit.storage.confined`). FileNotFoundError when missing,
        CorruptCheckpointError when not a regular file of that size."""

    def read_bytes(self, key: str) -> bytes:
        """The whole object, read through :meth:`open_member`'s checks."""

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write the whole object; on local filesystems the data is fsynced."""

    def write_stream(self, key: str, chunks: Iterable[memoryview], size: int | None = None) -> None:
        """Write the object from ``chunks`` (views of the caller's memory, consumed once,
        in order; ``size``: their total when known) without holding it whole in memory;
        like :meth:`write_bytes`, fsynced on local filesystems and visible only once
        complete on object stores."""

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def listdir(self, key: str = "") -> list[str]:
        """Names (not paths) directly below ``key``; [] when it does not exist."""

    def isdir(self, key: str) -> bool: ...

    def delete(self, key: str, recursive: bool = False) -> None:
        """Remove a file (or a directory tree); missing keys are ignored."""

    def rename(self, src: str, dst: str) -> None:
        """Atomic rename; only used when ``commit == "rename"``."""

    def mkdir(self, key: str) -> None: ...

    def sync_dir(self, key: str) -> None:
        """Make directory entries durable (fsync on local filesystems; no-op elsewhere)."""

    def local_path(self, key: str) -> str | None:
        """A real filesystem path for ``key`` when there is one (lets readers mmap)."""

    def invalidate(self) -> None:
        """Forget cached listings, so other processes' writes become visible."""

    def sha256(self, key: str) -> str | None:
        """The store's own sha256 of the object when it reports one cheaply, else None."""

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create ``key`` only if absent; False when it already exists (best effort on object stores)."""

    def mtime(self, key: str) -> float | None: ...

    def flush(self) -> None:
        """Block until background writes (e.g. Drive uploads) are durable; raise on failure."""

    def close(self) -> None:
        """Flush background work and release resources."""


def write_stream(
    storage: Storage, key: str, chunks: Iterable[memoryview], size: int | None = None
) -> None:
    """``storage.write_stream``, or one ``write_bytes`` of the joined chunks for a
    third-party storage written before the method existed."""
    writer = getattr(storage, "write_stream", None)
    if writer is not None:
        writer(key, chunks, size)
    else:
        storage.write_bytes(key, b"".join(chunks))


def releases_chunks(storage: Storage) -> bool:
    """Whether ``storage`` has the ``releases_chunks`` capability (see ``Storage``). It is
    a promise about ``write_stream``, so it holds only where declared at or below the
    class whose ``write_stream`` runs: a subclass of a local disk that overrides
    ``write_stream`` (a plugin that buffers chunks, or uploads them later) does not
    inherit it and must declare it again."""
    own = getattr(storage, "__dict__", {})  # the instance first: a write_stream set on it
    for where in (own, *(vars(cls) for cls in type(storage).__mro__)):
        if "releases_chunks" in where:
            return bool(where["releases_chunks"])
        if "write_stream" in where:
            return False
    return False


def join_key(*parts: str) -> str:
    """Join key parts with ``/``, ignoring empty ones."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))
