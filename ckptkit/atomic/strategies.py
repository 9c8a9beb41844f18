"""The two commit strategies and how one is chosen for a storage."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Mapping
from typing import NoReturn, Protocol

from ckptkit.errors import ConfigError, StorageError
from ckptkit.manifest import MANIFEST, parse_name
from ckptkit.storage.base import Storage, join_key
from ckptkit.storage.local import storage_error

TMP_PREFIX = ".tmp-"


class CommitStrategy(Protocol):
    name: str

    def commit(
        self, storage: Storage, target: str, files: Mapping[str, bytes], manifest: bytes
    ) -> None:
        """Make ``target`` appear with ``files`` and the manifest, all or nothing."""

    def leftovers(self, storage: Storage, names: list[str]) -> list[str]:
        """Entries of the run root that an interrupted commit left behind."""


class RenameCommit:
    name = "rename"

    def commit(
        self, storage: Storage, target: str, files: Mapping[str, bytes], manifest: bytes
    ) -> None:
        tmp = f"{TMP_PREFIX}{target}-{uuid.uuid4().hex[:8]}"
        try:
            storage.mkdir(tmp)
            for fname, data in files.items():
                storage.write_bytes(join_key(tmp, fname), data)  # fsyncs each file
            storage.write_bytes(join_key(tmp, MANIFEST), manifest)
            for folder in sorted({f.rsplit("/", 1)[0] for f in files if "/" in f}):
                storage.sync_dir(join_key(tmp, folder))  # a layout's sub-folder (dcp/)
            storage.sync_dir(tmp)
            storage.rename(tmp, target)
            storage.sync_dir("")
        except BaseException as exc:
            # Nothing became visible; drop the temp dir (a kill leaves it for cleanup).
            _abandon(storage, tmp)
            _reraise(storage, target, exc)

    def leftovers(self, storage: Storage, names: list[str]) -> list[str]:
        out = [n for n in names if n.startswith(TMP_PREFIX)]
        out += [n for n in names if parse_name(n) and not storage.exists(join_key(n, MANIFEST))]
        return out


class MarkerCommit:
    name = "marker"

    def commit(
        self, storage: Storage, target: str, files: Mapping[str, bytes], manifest: bytes
    ) -> None:
        # ``target`` is always a fresh name (a re-save at the same step gets a new
        # revision), so no committed checkpoint is touched here.
        try:
            for fname, data in files.items():
                storage.write_bytes(join_key(target, fname), data)
            storage.write_bytes(join_key(target, MANIFEST), manifest)
        except BaseException as exc:
            _abandon(storage, join_key(target, MANIFEST))
            _abandon(storage, target)
            _reraise(storage, target, exc)

    def leftovers(self, storage: Storage, names: list[str]) -> list[str]:
        return [n for n in names if parse_name(n) and not storage.exists(join_key(n, MANIFEST))]


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
