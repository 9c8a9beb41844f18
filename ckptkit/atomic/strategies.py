"""The two commit strategies and how one is chosen for a storage."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Protocol

from ckptkit.errors import ConfigError
from ckptkit.manifest import MANIFEST, parse_name
from ckptkit.storage.base import Storage, join_key

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
            storage.sync_dir(tmp)
            storage.rename(tmp, target)
            storage.sync_dir("")
        except BaseException:
            # Nothing became visible; drop the temp dir (a kill leaves it for cleanup).
            storage.delete(tmp, recursive=True)
            raise

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
        except BaseException:
            storage.delete(join_key(target, MANIFEST))
            storage.delete(target, recursive=True)
            raise

    def leftovers(self, storage: Storage, names: list[str]) -> list[str]:
        return [n for n in names if parse_name(n) and not storage.exists(join_key(n, MANIFEST))]


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
