"""What a committed checkpoint is: a directory whose ``manifest.json`` (written last)
lists every file with its size and sha256, plus the checkpoint's metadata.

A directory without a manifest that parses and verifies does not exist for readers.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ckptkit.errors import CorruptCheckpointError

FORMAT = "ckptkit/1"
MANIFEST = "manifest.json"

# Name order is step order: zero-padded step, then an optional revision for a
# second save at the same step (the older revision is deleted after the commit).
_NAME = re.compile(r"^step-(\d{12})(?:-r(\d+))?$")


def checkpoint_name(step: int, revision: int = 0) -> str:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step-{step:012d}" + (f"-r{revision}" if revision else "")


def parse_name(name: str) -> tuple[int, int] | None:
    """``(step, revision)`` for a checkpoint directory name, else None."""
    m = _NAME.match(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def versions() -> dict[str, str]:
    import numpy
    import torch

    from ckptkit import __version__

    return {
        "ckptkit": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def config_hash(config: dict[str, Any] | None) -> str | None:
    if config is None:
        return None
    canon = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return sha256_bytes(canon.encode())[:16]


@dataclass
class FileEntry:
    size: int
    sha256: str


@dataclass
class Manifest:
    """The commit record of one checkpoint. Readers trust nothing without it."""

    step: int
    files: dict[str, FileEntry]
    entries: dict[str, str]  # state key -> file holding it (see docs/FORMAT.md)
    epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    is_best: bool = False
    created: float = field(default_factory=time.time)
    config: dict[str, Any] | None = None
    config_hash: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    format: str = FORMAT

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True, default=str).encode()

    @classmethod
    def from_bytes(cls, data: bytes, source: str) -> Manifest:
        try:
            raw = json.loads(data)
            if raw.get("format") != FORMAT:
                raise ValueError(f"unknown format {raw.get('format')!r}")
            raw["files"] = {k: FileEntry(**v) for k, v in raw["files"].items()}
            return cls(**raw)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CorruptCheckpointError(
                f"{source}: unreadable manifest ({exc}); the checkpoint is incomplete or damaged"
            ) from exc

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files.values())
