"""The two commit strategies and how one is chosen for a storage."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn, Protocol

from ckptkit.errors import ConfigError, StorageError
from ckptkit.manifest import MANIFEST, FileEntry, file_hasher, parse_name
from ckptkit.storage.base import Storage, WriteLost, join_key, write_stream
from ckptkit.storage.local import storage_error

TMP_PREFIX = ".tmp-"

# A file's content: its bytes, or a function yielding them in chunks (views of the
# tensors' own memory: formats/native.py), consumed once; such a function may carry
# the total as ``.size`` (a GCS upload needs it up front).
Payload = bytes | Callable[[], Iterable[memoryview]]
# The manifest: its bytes, or a function of the written files' entries (sizes and the
# hashes computed while writing) returning them.
ManifestSource = bytes | Callable[[dict[str, FileEntry]], bytes]
# Files uploaded at once to a storage that declares ``parallel_writes`` (object stores).
MAX_PARALLEL = 4


class CommitStrategy(Protocol):
    name: str

    def commit(
        self,
        storage: Storage,
        target: str,
        files: Mapping[str, Payload],
        manifest: ManifestSource,
    ) -> dict[str, FileEntry]:
        """Make ``target`` appear with ``files`` and the manifest, all or nothing; returns
        each file's size and hash (xxh3-128, computed as the bytes were written)."""

    def leftovers(self, storage: Storage, names: list[str]) -> list[str]:
        """Entries of the run root that an interrupted commit left behind."""


class RenameCommit:
    name = "rename"

    def commit(
        self,
        storage: Storage,
        target: str,
        files: Mapping[str, Payload],
        manifest: ManifestSource,
    ) -> dict[str, FileEntry]:
        tmp = f"{TMP_PREFIX}{target}-{uuid.uuid4().hex[:8]}"
        # A storage that can fsync a batch of files at once (local disks) makes the
        # files and the manifest durable in one go; others fsync each as it is written.
        together = getattr(storage, "synced_together", contextlib.nullcontext)
        try:
            storage.mkdir(tmp)
            with together():
                entries = {f: put(storage, join_key(tmp, f), p) for f, p in files.items()}
                storage.write_bytes(join_key(tmp, MANIFEST), _manifest(manifest, entries))
            # Every file is durable here; then the folders that name them, then the rename.
            for folder in {f.rsplit("/", 1)[0] for f in files if "/" in f}:
                storage.sync_dir(join_key(tmp, folder))
            storage.sync_dir(tmp)
            storage.rename(tmp, target)
            storage.sync_dir("")
        except BaseException as exc:
            # Nothing became visible; drop the temp dir (a kill leaves it for cleanup).
            _abandon(storage, tmp)
            _reraise(storage, target, exc)
        return entries

    def leftovers(self, storage: Storage, names: list[str]) -> list[str]:
        return [n for n in names if n.startswith(TMP_PREFIX)] + without_manifest(storage, names)


class MarkerCommit:
    name = "marker"

    def commit(
        self,
        storage: Storage,
        target: str,
        files: Mapping[str, Payload],
        manifest: ManifestSource,
    ) -> dict[str, FileEntry]:
        # ``target`` is always a fresh name (a re-save at the same step gets a new
        # revision), so no committed checkpoint is touched here.
        try:
            workers = min(MAX_PARALLEL, getattr(storage, "parallel_writes", 1), len(files))
            if workers > 1:  # an object store: one upload per file at once hides latency
                with ThreadPoolExecutor(workers, thread_name_prefix="ckptkit-upload") as pool:
                    futures = {
                        f: pool.submit(put, storage, join_key(target, f), p)
                        for f, p in files.items()
                    }
                    entries = {f: future.result() for f, future in futures.items()}
            else:
                entries = {f: put(storage, join_key(target, f), p) for f, p in files.items()}
            storage.write_bytes(join_key(target, MANIFEST), _manifest(manifest, entries))
        except BaseException as exc:
            _abandon(storage, join_key(target, MANIFEST))
            _abandon(storage, target)
            _reraise(storage, target, exc)
        return entries

    def leftovers(self, storage: Storage, names: list[str]) -> list[str]:
        return without_manifest(storage, names)


def without_manifest(storage: Storage, names: list[str]) -> list[str]:
    """The checkpoint folders among ``names`` without a manifest. A storage that lists a
    whole tree at once (``find``: object stores) is asked once, not once per checkpoint
    (1,000 checkpoints made opening a writer on gs:// take ~15 s); others per name."""
    steps = [n for n in names if parse_name(n)]
    find = getattr(storage, "find", None)
    if find is None or len(steps) < 2:
        return [n for n in steps if not storage.exists(join_key(n, MANIFEST))]
    keys = set(find(""))
    return [n for n in steps if join_key(n, MANIFEST) not in keys]


# Times a file is written again from its first byte when the store lost the write in
# progress (WriteLost: a GCS upload session gone after its server restarted).
REWRITES = 2


def put(storage: Storage, key: str, payload: Payload) -> FileEntry:
    """Write one file, hashing each chunk as it goes by: the one place a checkpoint
    file's size and hash are computed. A write the store lost midway is made again from
    the payload (a callable gives its chunks anew), up to ``REWRITES`` times."""
    for _ in range(REWRITES):
        with contextlib.suppress(WriteLost):
            return _put_once(storage, key, payload)
    return _put_once(storage, key, payload)  # the last try: its WriteLost is raised


def _put_once(storage: Storage, key: str, payload: Payload) -> FileEntry:
    hasher, size = file_hasher(), 0

    def hashed() -> Iterable[memoryview]:
        nonlocal size
        for chunk in payload() if callable(payload) else (payload,):
            view = memoryview(chunk).cast("B")
            hasher.update(view)
            size += len(view)
            yield view

    size_hint = len(payload) if isinstance(payload, bytes) else getattr(payload, "size", None)
    write_stream(storage, key, hashed(), size_hint)
    return FileEntry(size=size, xxh3=hasher.hexdigest())


def _manifest(manifest: ManifestSource, entries: dict[str, FileEntry]) -> bytes:
    return manifest(entries) if callable(manifest) else manifest


def _abandon(storage: Storage, key: str) -> None:
    # Best effort: a failing cleanup must not hide why the commit failed; whatever
    # stays behind is invisible to readers and removed by the run's next writer.
    with contextlib.suppress(Exception):
        storage.delete(key, recursive=True)


def _reraise(storage: Storage, target: str, exc: BaseException) -> NoReturn:
    """Re-raise, turning a backend's bare OSError (full disk...) into a StorageError."""
    if isinstance(exc, OSError) and not isinstance(exc, StorageError):
        raise storage_error(storage.url_of(target), exc) from exc
    raise exc


_STRATEGIES: dict[str, type] = {"rename": RenameCommit, "marker": MarkerCommit}


def get_strategy(storage: Storage, name: str | CommitStrategy | None = None) -> CommitStrategy:
    """The strategy named (or given), else the one the storage declares."""
    if name is not None and not isinstance(name, str):
        return name
    key = name or getattr(storage, "commit", "marker")
    try:
        return _STRATEGIES[key]()
    except KeyError:
        raise ConfigError(
            f"unknown commit strategy {key!r}: use one of {sorted(_STRATEGIES)}"
        ) from None
