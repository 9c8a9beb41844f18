"""Atomic commit strategies: a checkpoint is either complete and verified, or invisible.

- ``rename``: write into a temporary directory beside the target, fsync, rename into
  place, fsync the parent (local filesystems, where rename is atomic).
- ``marker``: write the files in place, then the manifest last; the manifest is the
  commit (object stores and Drive, where rename is slow or not atomic).

Readers ignore anything that is not a checkpoint directory with a valid manifest, so
leftovers of an interrupted save are never read; the run's writer removes them later.
"""

from __future__ import annotations

from ckptkit.atomic.strategies import (
    CommitStrategy,
    MarkerCommit,
    RenameCommit,
    get_strategy,
    without_manifest,
)

__all__ = ["CommitStrategy", "MarkerCommit", "RenameCommit", "get_strategy", "without_manifest"]
