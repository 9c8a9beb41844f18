"""What every reader returns: a plain nested dict of tensors and primitives, plus provenance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Loaded:
    """A checkpoint read into memory, whatever its on-disk format.

    ``state`` maps top-level names (``"model"``, ``"optimizer"``, ``"epoch"``...) to what
    ``state_dict()`` returned when it was saved, or to the plain value. ``notes`` says,
    in words a user reads, what a legacy format lacked or how it was mapped
    (e.g. "no RNG state: data order will differ").

    ``contents`` is set where ``state`` adds names a reader mapped for ``restore`` (a
    legacy dict checkpoint): every entry of the file under its own name, nothing added,
    which is what ``ckptkit.load`` returns. ``state`` holds all of them too.
    """

    state: dict[str, Any]
    kind: str  # "native", "legacy-state-dict", "legacy-dict", "hf-trainer"
    source: str  # URL it was read from
    step: int | None = None
    epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    contents: dict[str, Any] | None = None
