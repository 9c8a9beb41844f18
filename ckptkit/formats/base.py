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
    """

    state: dict[str, Any]
    kind: str  # "native", "legacy-state-dict", "legacy-dict", "hf-trainer"
    source: str  # URL it was read from
    step: int | None = None
    epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
