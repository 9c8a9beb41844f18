"""Reading a run: the committed checkpoints under a run URL, oldest first.

Only directories named like checkpoints whose manifest parses count; everything
else (temporary directories, half-deleted or half-written checkpoints) is ignored.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any

from ckptkit.errors import CheckpointNotFoundError, CorruptCheckpointError
from ckptkit.formats import native
from ckptkit.formats.base import Loaded
from ckptkit.manifest import MANIFEST, Manifest, parse_name
from ckptkit.storage.base import Storage, join_key

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


def read_manifest(storage: Storage, name: str) -> Manifest:
    url = storage.url_of(name)
    try:
        data = storage.read_bytes(join_key(name, MANIFEST))
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"{url}: no manifest (an interrupted save); it is ignored"
        ) from None
    return Manifest.from_bytes(data, url)


def check_sizes(storage: Storage, info: CheckpointInfo) -> None:
    """The cheap check: every listed file exists with the recorded size."""
    for fname, entry in info.manifest.files.items():
        key = join_key(info.name, fname)
        try:
            size = storage.size(key)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{info.url}: {fname} is missing") from None
        if size != entry.size:
            raise CorruptCheckpointError(
                f"{info.url}/{fname}: size {size} != {entry.size} in the manifest"
            )


def verify(storage: Storage, info: CheckpointInfo) -> None:
    """The full check: sizes and sha256 of every file (reads everything)."""
    check_sizes(storage, info)
    for fname in info.manifest.files:
        native.check_file(
            info.manifest, fname, storage.read_bytes(join_key(info.name, fname)), info.url
        )


def list_checkpoints(storage: Storage, *, quiet: bool = False) -> list[CheckpointInfo]:
    """Committed checkpoints, oldest first (one listing of the run root + one manifest read each)."""
    storage.invalidate()
    out: list[CheckpointInfo] = []
    for name in storage.listdir(""):
        if parse_name(name) is None:
            continue
        if not storage.exists(join_key(name, MANIFEST)):
            continue  # not committed (yet): invisible by design
        try:
            manifest = read_manifest(storage, name)
        except CorruptCheckpointError as exc:
            if not quiet:
                warn(f"skipping {exc}")
            continue
        out.append(CheckpointInfo(name=name, url=storage.url_of(name), manifest=manifest))
    out.sort(key=lambda c: parse_name(c.name) or (0, 0))
    return out


def read_state(
    storage: Storage, info: CheckpointInfo, *, verify: bool = True, keys: set[str] | None = None
) -> dict[str, Any]:
    """Decode a checkpoint's state (verifying sizes and hashes unless ``verify=False``)."""

    def read(fname: str) -> bytes:
        try:
            return storage.read_bytes(join_key(info.name, fname))
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{info.url}: {fname} is missing") from None

    return native.decode(info.manifest, read, info.url, verify=verify, keys=keys)


def find(checkpoints: list[CheckpointInfo], which: str | int, url: str) -> CheckpointInfo:
    """A checkpoint of the run by step number or directory name."""
    if isinstance(which, int) or (isinstance(which, str) and which.isdigit()):
        matches = [c for c in checkpoints if c.step == int(which)]
    else:
        matches = [c for c in checkpoints if c.name == which]
    if not matches:
        steps = ", ".join(str(c.step) for c in checkpoints[-10:]) or "none"
        raise CheckpointNotFoundError(f"{url}: no checkpoint {which!r} (steps available: {steps})")
    return matches[-1]


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
            "files": {k: {"size": v.size, "sha256": v.sha256} for k, v in manifest.files.items()},
        },
    )


def read(storage: Storage, info: CheckpointInfo, *, verify: bool = True) -> Loaded:
    """Read one committed checkpoint of a run (verifying sizes and hashes by default)."""
    return as_loaded(read_state(storage, info, verify=verify), info.url, info.manifest)
