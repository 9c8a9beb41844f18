"""A ``CheckpointManager`` under ``torch.distributed``: who writes, who waits, what each
rank gets back (docs/INTEGRATIONS.md, "torchrun / DDP / FSDP").

- Rank 0 writes replicated state once; every rank's per-rank state (``RNGState``,
  ``ResumableDataLoader``: objects whose class sets ``ckptkit_per_rank = True``) is
  gathered to rank 0 and stored under ``RANKS``; sharded state (``ShardedState``) is
  written by every rank through ``torch.distributed.checkpoint`` (``formats/sharded.py``).
- Every collective runs on a gloo group of its own with a timeout, so that a rank that
  never answers is an exception after ``timeout`` seconds, never a hang; an exception
  on rank 0 (a failed commit, a corrupt checkpoint) is broadcast and raised on every rank.
- Restore: rank 0 reads and verifies the checkpoint, every rank receives it; each takes
  its own per-rank entries back at the same world size. At another world size the data
  position is mapped by the samples consumed, and every rank gets rank 0's RNG state
  (with a warning: random streams then differ from an uninterrupted run).
"""

from __future__ import annotations

import contextlib
import pickle
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from ckptkit.errors import CkptError, ConfigError, StorageError
from ckptkit.run import CheckpointInfo, warn
from ckptkit.stateful import collect_state

if TYPE_CHECKING:
    from ckptkit.formats.base import Loaded
    from ckptkit.manager import CheckpointManager

# The reserved state key holding every rank's per-rank state:
# ``{"world_size": W, "states": {key: [rank 0's state, rank 1's, ...]}}``.
RANKS = "ckptkit.ranks"
DEFAULT_TIMEOUT = 1800.0  # seconds: torch's own default for a gloo process group


def is_per_rank(obj: Any) -> bool:
    return bool(getattr(type(obj), "ckptkit_per_rank", False))


def is_sharded(obj: Any) -> bool:
    return getattr(type(obj), "ckptkit_layout", None) == "dcp"


def rank_and_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Group:
    """The ranks of one manager: a gloo group (CPU objects whatever the training backend
    is) whose every operation gives up after ``timeout`` seconds. Created collectively."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not (isinstance(timeout, int | float) and not isinstance(timeout, bool)) or timeout <= 0:
            raise ConfigError(
                f"distributed_timeout must be a number of seconds > 0, got {timeout!r}"
            )
        self.timeout = float(timeout)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.pg = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout))

    def _collective(self, what: str, op: Callable[[], Any]) -> Any:
        try:
            return op()
        except (RuntimeError, OSError) as exc:  # gloo: a timeout, a peer gone
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise StorageError(
                f"rank {self.rank}: the other ranks did not take part in the {what} within "
                f"{self.timeout:g} s ({first}); every rank must call it (a rank may have "
                "died): pass a larger distributed_timeout if it is only slow"
            ) from exc

    def on_main(self, fn: Callable[[], Any], what: str) -> Any:
        """``fn()`` on rank 0; its result (or its exception, raised) on every rank."""
        payload: list[Any] = [None]
        error: BaseException | None = None
        if self.rank == 0:
            try:
                payload[0] = ("ok", fn())
            except BaseException as exc:  # noqa: BLE001 - every rank must hear of it
                error = exc
                payload[0] = ("error", _portable(exc, 0))
        self._collective(what, lambda: dist.broadcast_object_list(payload, src=0, group=self.pg))
        if error is not None:
            raise error
        kind, value = payload[0]
        if kind == "error":
            raise value
        return value

    def gather(self, obj: Any, what: str) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (by rank); None elsewhere."""
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        self._collective(what, lambda: dist.gather_object(obj, out, dst=0, group=self.pg))
        return out

    def all_ok(self, error: BaseException | None, what: str) -> None:
        """Raise on every rank when ``error`` is set on any: this rank's own, else the
        first failing rank's."""
        errors: list[Any] = [None] * self.world_size
        mine = None if error is None else _portable(error, self.rank)
        self._collective(what, lambda: dist.all_gather_object(errors, mine, group=self.pg))
        if error is not None:
            raise error
        failed = next((e for e in errors if e is not None), None)
        if failed is not None:
            raise failed

    def union(self, items: list[str], what: str) -> list[str]:
        """Every rank's ``items``, in rank order, without repeats: one decision for all."""
        everyone: list[Any] = [None] * self.world_size
        self._collective(what, lambda: dist.all_gather_object(everyone, items, group=self.pg))
        return list(dict.fromkeys(i for rank_items in everyone for i in rank_items))


def _portable(exc: BaseException, rank: int) -> BaseException:
    """``exc`` as it can travel to another rank (itself when it pickles)."""
    with contextlib.suppress(Exception):
        copy = pickle.loads(pickle.dumps(exc))
        if type(copy) is type(exc):
            return copy
    return CkptError(f"rank {rank}: {type(exc).__name__}: {str(exc)[:300]}")


# -- saving ---------------------------------------------------------------------------
def save(
    mgr: CheckpointManager,
    group: Group,
    step: int,
    state: Mapping[str, Any],
    metrics: Mapping[str, float] | None,
    epoch: int | None,
) -> CheckpointInfo:
    """``mgr.save`` on every rank: the same ``CheckpointInfo`` returned on all."""
    from ckptkit.formats import sharded

    error: BaseException | None = None
    local: dict[str, Any] = {}
    dcp_state: dict[str, Any] = {}
    full: dict[str, Any] = {}
    try:
        mgr._writable("save")  # a readonly manager refuses on every rank
        full = mgr._with_extra_state(state)
        local = collect_state({k: v for k, v in full.items() if is_per_rank(v)})
        dcp_state = collect_state({k: v for k, v in full.items() if is_sharded(v)})
    except BaseException as exc:  # noqa: BLE001 - a rank that cannot save stops them all
        error = exc
    group.all_ok(error, "save")
    gathered = group.gather(local, "save")
    # Collective: every rank writes its shards; rank 0 gets every file back.
    folder = sharded.encode(dcp_state, group) if dcp_state else None

    def commit() -> CheckpointInfo:
        started = time.monotonic()
        mgr._pm.hook.ckptkit_before_save(manager=mgr, step=step, state=state)
        rest = collect_state({k: v for k, v in full.items() if k not in dcp_state})
        assert gathered is not None
        rest[RANKS] = {
            "world_size": group.world_size,
            "states": {key: [g[key] for g in gathered] for key in local},
        }
        saved_epoch = epoch
        if saved_epoch is None and isinstance(state.get("epoch"), int):
            saved_epoch = int(state["epoch"])
        manifest = mgr._manifest(step, full, metrics, saved_epoch)
        manifest.metadata["world_size"] = group.world_size
        existing = mgr._committed_for_rotation()
        info = mgr._write(rest, manifest, folder)
        mgr._finish(info, existing, started)
        return info

    info = group.on_main(commit, "save")
    if group.rank != 0:  # rank 0's triggers heard of it in _finish
        for trigger in mgr.triggers:
            trigger.saved(info.step, time.monotonic())
    return info


# -- restoring ------------------------------------------------------------------------
def for_this_rank(full: Mapping[str, Any], data: Loaded, group: Group | None) -> dict[str, Any]:
    """``data.state`` as this rank restores it: its own per-rank entries at the saving
    world size; at another one the loader position mapped by samples consumed and rank
    0's RNG for every rank (warned once, by rank 0)."""
    from ckptkit.state.dataloader import ResumableDataLoader, remap_state

    rank, world = (group.rank, group.world_size) if group is not None else rank_and_size()
    saved = dict(data.state)
    ranks = saved.get(RANKS)
    meta = data.meta.get("metadata") if isinstance(data.meta, Mapping) else None
    saved_world = meta.get("world_size") if isinstance(meta, Mapping) else None
    if isinstance(ranks, Mapping) and isinstance(ranks.get("world_size"), int):
        saved_world = ranks["world_size"]
    states = ranks.get("states") if isinstance(ranks, Mapping) else None
    states = states if isinstance(states, Mapping) else {}
    said: list[str] = []
    for key, obj in full.items():
        if not is_per_rank(obj) or key not in saved:
            continue
        mine = states.get(key)
        if saved_world == world and isinstance(mine, list) and len(mine) == world:
            saved[key] = mine[rank]
        elif isinstance(obj, ResumableDataLoader):
            saved[key], note = remap_state(saved[key], obj)
            if note:
                said.append(f"state['{key}']: {note}")
        elif saved_world is not None and saved_world != world:
            said.append(
                f"state['{key}'] was saved at world size {saved_world} and is restored at "
                f"{world}: every rank gets rank 0's state (random streams differ from an "
                "uninterrupted run)"
            )
    if rank == 0:
        for note in said:
            warn(f"restored {data.source}: {note}")
    return saved


def restore_apply(group: Group | None, apply: Callable[[], Any]) -> Any:
    """``apply()`` on this rank; with ``group``, an exception on any rank is raised on
    every rank (a restore half the ranks refused must not train on)."""
    if group is None:
        return apply()
    result, error = None, None
    try:
        result = apply()
    except BaseException as exc:  # noqa: BLE001
        error = exc
    group.all_ok(error, "restore")
    return result
