"""Reading a run: the committed checkpoints under a run URL, oldest first.

Only directories named like checkpoints whose manifest parses count; everything
else (temporary directories, half-deleted or half-written checkpoints) is ignored.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ckptkit.errors import CheckpointNotFoundError, CorruptCheckpointError
from ckptkit.formats import native
from ckptkit.formats.base import Loaded
from ckptkit.manifest import MANIFEST, MAX_MANIFEST_BYTES, Manifest, check_manifest_size, parse_name
from ckptkit.storage import confined
from ckptkit.storage.base import Storage, join_key
from ckptkit.storage.mapping import Lending
from ckptkit.storage.names import UnsafeNameError, check_member_name

log = logging.getLogger("ckptkit")
# A library logs only where the application configured logging; the warning below is
# what users see by default (without this, Python's last-resort handler prints it twice).
log.addHandler(logging.NullHandler())


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (incomplete or corrupt) or restored only in part."""


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str, category: type[Warning] = CheckpointWarning) -> None:
    """Log ``message`` and warn with it at the user's line: the first frame outside the
    ckptkit package, however deep inside ckptkit the warning arose (a fixed stacklevel
    would point into ckptkit whenever the call chain changes)."""
    log.warning(message)
    warnings.warn(message, category, stacklevel=_caller_stacklevel())


def _caller_stacklevel() -> int:
    # Level 1 is warn() itself (the frame calling warnings.warn); count up from there.
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint: its name in the run, URL and manifest."""

    name: str
    url: str
    manifest: Manifest

    @property
    def step(self) -> int:
        return self.manifest.step

    @property
    def revision(self) -> int:
        parsed = parse_name(self.name)
        return parsed[1] if parsed else 0

    @property
    def epoch(self) -> int | None:
        return self.manifest.epoch

    @property
    def metrics(self) -> dict[str, float]:
        return self.manifest.metrics

    @property
    def is_best(self) -> bool:
        return self.manifest.is_best

    @property
    def size(self) -> int:
        return self.manifest.total_size

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "name": self.name,
            "url": self.url,
            "step": m.step,
            "epoch": m.epoch,
            "metrics": m.metrics,
            "is_best": m.is_best,
            "created": m.created,
            "size": m.total_size,
            "files": len(m.files),
        }


def status_row(name: str, path: str, step: int | None, checked: str) -> dict[str, Any]:
    """The shape of one ``ckptkit ls`` row before anything is known of the checkpoint:
    every key present, so ``--json`` readers see the same fields on every row."""
    return {
        "name": name,
        "path": path,
        "step": step,
        "epoch": None,
        "metrics": {},
        "created": None,
        "size": None,
        "files": None,
        "status": "complete",
        "problem": None,
        "checked": checked,
    }


def _manifest_of(storage: Storage, name: str) -> Manifest | None:
    """The manifest of checkpoint ``name`` ("" for the storage's own root), None when it
    has none (not committed); CorruptCheckpointError when it is malformed."""
    url = storage.url_of(name)
    key = join_key(name, MANIFEST)
    try:
        check_manifest_size(storage.size(key), url)  # before reading: a hostile one is huge
        data = confined.read_member(storage, key, max_size=MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        return None
    dirname = name or url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return Manifest.from_bytes(data, url, name=dirname)


def read_manifest(storage: Storage, name: str) -> Manifest:
    """The (type-checked) manifest of checkpoint ``name``; CorruptCheckpointError when it
    is missing or malformed, or names another step than the directory does."""
    manifest = _manifest_of(storage, name)
    if manifest is None:
        raise CorruptCheckpointError(
            f"{storage.url_of(name)}: no manifest (an interrupted save); it is ignored"
        )
    return manifest


def open_file(storage: Storage, info: CheckpointInfo, fname: str) -> confined.Member:
    """Open one file of a checkpoint: listed in its manifest, a regular file inside it of
    the recorded size (see ``ckptkit.storage.confined``), else CorruptCheckpointError."""
    entry = info.manifest.files.get(fname)
    if entry is None:
        raise CorruptCheckpointError(f"{info.url}: {fname} is not listed in the manifest")
    try:  # at most one sub-folder level (ckptkit/2 layouts); the manifest checked it too
        check_member_name(fname, allow_subdirs=True)
    except UnsafeNameError as exc:
        raise CorruptCheckpointError(f"{info.url}: {exc} in the manifest") from None
    try:
        return confined.open_member(storage, join_key(info.name, fname), size=entry.size)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{info.url}: {fname} is missing") from None


def read_file(storage: Storage, info: CheckpointInfo, fname: str) -> bytes:
    """The bytes of one file of a checkpoint, never more than the manifest records."""
    with open_file(storage, info, fname) as member:
        return member.read()


def check_sizes(storage: Storage, info: CheckpointInfo) -> None:
    """The cheap check: every listed file is a regular file of the recorded size."""
    for fname in info.manifest.files:
        open_file(storage, info, fname).close()


def verify(storage: Storage, info: CheckpointInfo) -> None:
    """The full check: sizes and hashes of every file (reads everything, streamed)."""
    native.check_files(info.manifest, lambda f: open_file(storage, info, f), info.url)


@dataclass(frozen=True)
class Scan:
    """One look at a run: committed checkpoints (oldest first) and damaged ones, those
    whose manifest exists but is malformed (name -> the problem, one line)."""

    committed: list[CheckpointInfo]
    damaged: dict[str, str]


def checkpoint_names(storage: Storage) -> list[str]:
    """The run's checkpoint directory names, oldest first by (step, revision): one fresh
    listing of the run root (on an object store, one request per 1,000 entries), no
    manifest read. Committed or not: only a manifest says."""
    storage.invalidate()
    names = [n for n in storage.listdir("") if parse_name(n) is not None]
    return sorted(names, key=lambda n: parse_name(n) or (0, 0))


def scan(storage: Storage, names: list[str] | None = None) -> Scan:
    """Every ``step-*`` directory of the run (``names``, else listed) with a manifest,
    good or damaged: one manifest read each. Directories without a manifest are
    interrupted saves: in neither list."""
    committed: list[CheckpointInfo] = []
    damaged: dict[str, str] = {}
    for name in checkpoint_names(storage) if names is None else names:
        try:
            manifest = _manifest_of(storage, name)
        except CorruptCheckpointError as exc:
            damaged[name] = str(exc)
            continue
        if manifest is not None:
            committed.append(CheckpointInfo(name=name, url=storage.url_of(name), manifest=manifest))
    return Scan(committed, damaged)


def list_checkpoints(storage: Storage, *, quiet: bool = False) -> list[CheckpointInfo]:
    """Committed checkpoints, oldest first; a damaged one is skipped with a warning."""
    found = scan(storage)
    if not quiet:
        for problem in found.damaged.values():
            warn(f"skipping {problem}")
    return found.committed


def newest_first(
    storage: Storage, names: list[str] | None = None, *, quiet: bool = False
) -> Iterator[CheckpointInfo]:
    """Committed checkpoints, newest first, each manifest read only once the iteration
    gets to it: finding the newest valid checkpoint costs one listing and the manifests
    from the newest down to it, however many checkpoints the run holds. The name order
    is the commit order (a re-save of a step gets a higher revision), so nothing but
    the manifests themselves is trusted. A damaged one passed is skipped with a warning
    (unless ``quiet``); one without a manifest (an interrupted save) silently."""
    for name in reversed(checkpoint_names(storage) if names is None else names):
        try:
            manifest = _manifest_of(storage, name)
        except CorruptCheckpointError as exc:
            if not quiet:
                warn(f"skipping {exc}")
            continue
        if manifest is not None:
            yield CheckpointInfo(name=name, url=storage.url_of(name), manifest=manifest)


def find_checkpoint(storage: Storage, which: str | int, url: str) -> CheckpointInfo:
    """The checkpoint of the run at step ``which`` (its newest committed revision) or
    named ``which``, reading only the manifests of the directories it names. Asking for
    a damaged one raises CorruptCheckpointError naming the damage, not "not found"."""
    by_step = isinstance(which, int) or (isinstance(which, str) and which.isdigit())

    def wanted(name: str) -> bool:
        parsed = parse_name(name)
        return name == which if not by_step else parsed is not None and parsed[0] == int(which)

    names = [n for n in checkpoint_names(storage) if wanted(n)]
    damaged: dict[str, str] = {}
    for name in reversed(names):
        try:
            manifest = _manifest_of(storage, name)
        except CorruptCheckpointError as exc:
            damaged[name] = str(exc)
            continue
        if manifest is not None:
            return CheckpointInfo(name=name, url=storage.url_of(name), manifest=manifest)
    if damaged:  # the newest damaged revision (the first met), as a good match would be
        raise CorruptCheckpointError(next(iter(damaged.values())))
    steps = ", ".join(str(c.step) for c in list_checkpoints(storage, quiet=True)[-10:])
    raise CheckpointNotFoundError(
        f"{url}: no checkpoint {which!r} (steps available: {steps or 'none'})"
    )


def read_state(
    storage: Storage,
    info: CheckpointInfo,
    *,
    verify: bool = True,
    keys: set[str] | None = None,
    lending: Lending | None = None,
) -> dict[str, Any]:
    """Decode a checkpoint's state (verifying sizes and hashes unless ``verify=False``):
    the one read path of native checkpoints, ``formats/native.py``."""
    return native.read_state(
        info.manifest,
        lambda f: open_file(storage, info, f),
        info.url,
        verify=verify,
        keys=keys,
        lending=lending,
    )


def as_loaded(state: dict[str, Any], source: str, manifest: Manifest) -> Loaded:
    """A native checkpoint's state with its manifest's facts, as every reader returns it."""
    return Loaded(
        state=state,
        kind="native",
        source=source,
        step=manifest.step,
        epoch=manifest.epoch,
        metrics=dict(manifest.metrics),
        meta={
            "config": manifest.config,
            "config_hash": manifest.config_hash,
            "metadata": manifest.metadata,
            "versions": manifest.versions,
            "created": manifest.created,
            "is_best": manifest.is_best,
            "files": {k: v.to_json() for k, v in manifest.files.items()},
        },
    )


def read(
    storage: Storage, info: CheckpointInfo, *, verify: bool = True, lending: Lending | None = None
) -> Loaded:
    """Read one committed checkpoint of a run (verifying sizes and hashes by default;
    ``lending``: see ``native.read_state``)."""
    state = read_state(storage, info, verify=verify, lending=lending)
    return as_loaded(state, info.url, info.manifest)
