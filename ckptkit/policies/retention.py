"""What to keep. Each policy names the checkpoints it wants kept; a checkpoint is
deleted only when no policy keeps it and it is not protected (the best, the one the
run was restored from, the newest)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ckptkit.errors import ConfigError

if TYPE_CHECKING:
    from ckptkit.manager import CheckpointInfo


class RetentionPolicy(Protocol):
    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        """Names to keep, given committed checkpoints sorted oldest first."""


@dataclass(frozen=True)
class KeepLastN:
    n: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(
                f"keep_last must be >= 1 (got {self.n}); use None to keep every checkpoint"
            )

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        return {c.name for c in checkpoints[-self.n :]}


@dataclass(frozen=True)
class KeepBestK:
    """The ``k`` best by ``metric`` (``mode`` min or max). Without a metric, the newest
    checkpoint an EarlyStopping marked as best is kept."""

    k: int
    metric: str | None = None
    mode: str = "min"

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"keep_best must be >= 1 (got {self.k}); use 0 to disable it")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"mode must be 'min' or 'max', got {self.mode!r}")

    def ranked(self, checkpoints: Sequence[CheckpointInfo]) -> list[CheckpointInfo]:
        if self.metric is None:
            return [c for c in reversed(checkpoints) if c.is_best]
        scored = [c for c in checkpoints if isinstance(c.metrics.get(self.metric), (int, float))]
        sign = 1.0 if self.mode == "min" else -1.0
        # Ties go to the older checkpoint: it reached the value first.
        return sorted(scored, key=lambda c: (sign * float(c.metrics[self.metric]), c.step))

    def keep(self, checkpoints: Sequence[CheckpointInfo]) -> set[str]:
        return {c.name for c in self.ranked(checkpoints)[: self.k]}


def select_deletions(
    checkpoints: Sequence[CheckpointInfo],
    policies: Sequence[RetentionPolicy],
    protected: set[str],
) -> list[CheckpointInfo]:
    """Checkpoints (oldest first) that no policy keeps and nothing protects."""
    if not policies or not checkpoints:
        return []
    kept = set(protected) | {checkpoints[-1].name}
    for policy in policies:
        kept |= policy.keep(checkpoints)
    return [c for c in checkpoints if c.name not in kept]
