"""CheckpointManager: save / restore / latest / best / list — orchestration only.

Encoding lives in ``formats``, commit in ``atomic``, what to keep and when to save in
``policies``, bytes in ``storage``; this module wires them together and calls hooks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

import torch

from ckptkit import distributed as distmod
from ckptkit import run as runmod
from ckptkit.asyncsave import SNAPSHOTS, AsyncSaver
from ckptkit.atomic import CommitStrategy, get_strategy, without_manifest
from ckptkit.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
)
from ckptkit.formats import native
from ckptkit.formats.base import Loaded
from ckptkit.hooks.manager import get_plugin_manager
from ckptkit.lock import RunLock
from ckptkit.manifest import (
    MANIFEST,
    MAX_STEP,
    FileEntry,
    Manifest,
    checkpoint_name,
    config_hash,
    epoch_value,
    metric_values,
    parse_name,
    versions,
)
from ckptkit.policies import (
    Deadline,
    EveryNSteps,
    EveryTMinutes,
    KeepBestK,
    KeepLastN,
    RetentionPolicy,
    SaveTrigger,
    SignalTrigger,
    parse_duration,
    select_deletions,
)
from ckptkit.run import CheckpointInfo, warn
from ckptkit.stateful import apply_state, collect_state, state_classes
from ckptkit.storage.base import Storage, join_key
from ckptkit.storage.mapping import Lending
from ckptkit.storage.registry import open_storage, scheme_of

# Exit code for "stopped early on purpose (signal or time limit), resume me":
# EX_TEMPFAIL from sysexits.h, which schedulers' retry loops can test for.
EXIT_RESUMABLE = 75
RUN_INFO = "run.json"
_PLACEHOLDER = FileEntry(size=0, xxh3="0" * 32)  # stands for a file not written yet


class ResumeResult(int):
    """What ``restore``/``resume`` did: ``resumed`` (False: starting fresh), ``step``
    (the restored checkpoint's step; None when fresh, or when a foreign file records
    none), ``checkpoint`` (the ``CheckpointInfo`` of this run's checkpoint it came from;
    None when fresh or read from a path outside the run) and ``source`` (the URL read).

    It is also the int these methods used to return, so ``start = mgr.resume(state) or 0``,
    ``range(result, n)``, ``result + 1`` and ``result == 5`` keep working: its value is
    ``step`` (0 when there is none), it is true when it resumed (also from step 0), and
    it equals None when it did not resume. ``result is None`` is never true: test
    ``result.resumed``. Immutable.
    """

    resumed: bool
    step: int | None
    checkpoint: CheckpointInfo | None
    source: str | None

    def __new__(
        cls,
        resumed: bool,
        step: int | None = None,
        checkpoint: CheckpointInfo | None = None,
        source: str | None = None,
    ) -> ResumeResult:
        self = super().__new__(cls, step or 0)
        for name, value in (
            ("resumed", bool(resumed)),
            ("step", step),
            ("checkpoint", checkpoint),
            ("source", source),
        ):
            object.__setattr__(self, name, value)
        return self

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"ResumeResult is immutable (cannot set {name})")

    def __bool__(self) -> bool:
        return self.resumed

    def __eq__(self, other: object) -> bool:
        if other is None:
            return not self.resumed
        if isinstance(other, ResumeResult):
            return (self.resumed, self.step, self.source) == (
                other.resumed,
                other.step,
                other.source,
            )
        return int(self) == other

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = int.__hash__

    def __repr__(self) -> str:
        where = self.checkpoint.name if self.checkpoint is not None else self.source
        return f"ResumeResult(resumed={self.resumed}, step={self.step}, from={where!r})"

    def __str__(self) -> str:
        return int.__repr__(self)

    def __format__(self, spec: str) -> str:
        return int.__format__(int(self), spec)

    def __reduce__(self) -> Any:
        return (ResumeResult, (self.resumed, self.step, self.checkpoint, self.source))


class CheckpointManager:
    """Saves and restores training state under one run URL.

    ``state`` is a dict of named objects with ``state_dict()``/``load_state_dict()``
    (model, optimizer, scheduler, ``RNGState()``, ``EarlyStopping``, a
    ``ResumableDataLoader``...) or plain values (ints, floats, strings, lists/dicts of
    them), which ``restore`` writes back into the dict.

    Retention: the last ``keep_last`` checkpoints and the ``keep_best`` best by
    ``best_metric`` are kept (``keep_last=None`` keeps every checkpoint); the best one
    and the one this run was restored from are never deleted.

    ``trainable_only=True`` saves and restores every ``torch.nn.Module`` in ``state``
    through ``TrainableOnly(module)``: its ``requires_grad`` parameters and buffers, with a
    fingerprint of its frozen weights that a restore must match (docs/RESUME.md).

    Under ``torch.distributed`` (``distributed=None``: when it is initialized) construct,
    save and restore on every rank: rank 0 writes, every rank's RNG and loader position is
    kept, ``ShardedState`` goes through DCP, and an error or a rank silent for
    ``distributed_timeout`` seconds raises on every rank (docs/INTEGRATIONS.md).

    ``async_save=True``: ``save()`` returns once a consistent snapshot of the state is
    taken and writes it in the background; it is committed by the next ``save``, or
    ``wait()``/``close()`` (docs/RESUME.md, "Async save"). ``async_snapshot``:
    ``"deferred"`` (the default) takes what the state's optimizers own (their parameters
    and state) after ``save()`` returns: on local disks it streams them from live memory
    and their next ``step()`` first copies only what is not written yet (nothing when the
    save ended); elsewhere the writer copies them first and that ``step()`` waits for the
    copy; ``"rolling"`` (also chosen by itself when a copy of the state would take more
    than half the memory left) frees what a step copied once it is written;
    ``"eager"`` copies every tensor inside ``save()`` (for a loop that writes parameters
    in place outside ``step()`` through ``.data``).
    """

    def __init__(
        self,
        url: str,
        *,
        keep_last: int | None = 3,
        keep_best: int = 1,
        best_metric: str | None = None,
        mode: str = "min",
        save_every_steps: int | None = None,
        save_every_minutes: float | None = None,
        save_on_epoch_end: bool = True,
        handle_signals: bool = False,
        time_limit: str | float | None = None,
        config: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        run_name: str | None = None,
        verify: bool = True,
        readonly: bool = False,
        break_lock: bool = False,
        commit: str | CommitStrategy | None = None,
        retention: list[RetentionPolicy] | None = None,
        triggers: list[SaveTrigger] | None = None,
        trainable_only: bool = False,
        distributed: bool | None = None,
        distributed_timeout: float = distmod.DEFAULT_TIMEOUT,
        async_save: bool = False,
        async_snapshot: str = "deferred",
    ) -> None:
        if mode not in ("min", "max"):
            raise ConfigError(f"mode must be 'min' or 'max', got {mode!r}")
        if async_snapshot not in SNAPSHOTS:
            raise ConfigError(
                f"async_snapshot must be one of {', '.join(map(repr, SNAPSHOTS))}, "
                f"got {async_snapshot!r}"
            )
        self.url = url
        self.storage: Storage = open_storage(url)
        self.strategy = get_strategy(self.storage, commit)
        self.best_metric = best_metric
        self.mode = mode
        self.verify = verify
        self.config = dict(config) if config is not None else None
        self.metadata = dict(metadata or {})
        self.save_on_epoch_end = save_on_epoch_end
        self.restored_from: CheckpointInfo | None = None
        self.stop_reason: str | None = None
        self._stop_after_save = False
        self._uncommitted: list[CheckpointInfo] = []
        # What this writer knows of the run, for its own bookkeeping (rotation): the
        # committed checkpoints by name, read once (at the first save, so a previous
        # writer's are included) plus those it commits; and the names read that have no
        # usable manifest. None until first needed: a new manager starts afresh.
        self._known: dict[str, CheckpointInfo] | None = None
        self._unusable: set[str] = set()
        self._listing: list[str] | None = None  # this save's listing of checkpoint names
        self._pm = get_plugin_manager()

        self.retention: list[RetentionPolicy] = list(retention or [])
        # keep_last=None keeps every checkpoint: a best-K policy alone would delete all
        # but the best K, which is not what "no limit" means.
        if retention is None and keep_last is not None:
            self.retention.append(KeepLastN(keep_last))
            if keep_best:
                self.retention.append(KeepBestK(keep_best, best_metric, mode))
        self._best_ranker = KeepBestK(1, best_metric, mode)

        self.triggers: list[SaveTrigger] = list(triggers or [])
        if save_every_steps:
            self.triggers.append(EveryNSteps(save_every_steps))
        if save_every_minutes:
            self.triggers.append(EveryTMinutes(save_every_minutes))
        self._signals: SignalTrigger | None = None
        if handle_signals:
            self._signals = SignalTrigger()
            self._signals.install()
            self.triggers.append(self._signals)
        self._deadline: Deadline | None = None
        if time_limit is not None:
            self._deadline = Deadline(parse_duration(time_limit))
            self.triggers.append(self._deadline)

        self.trainable_only = trainable_only
        # One wrapper per model, so that its frozen fingerprint is hashed once, not per save.
        self._trainable: dict[int, Any] = {}
        self.readonly = readonly
        if distributed is None:  # a reader (readonly=True) may be used on one rank alone
            distributed = _dist_initialized() and not readonly
        # Collective: every rank constructs its manager (distributed=False on a manager
        # that rank 0 alone uses).
        self._group = distmod.Group(distributed_timeout) if distributed else None
        self.writer = not readonly and _is_main_process()
        self._lock = RunLock(self.storage) if self.writer else None
        if self._group is not None:  # rank 0 opens the run; a failure raises on every rank
            self.run_name = self._group.on_main(lambda: self._open(break_lock, run_name), "open")
        else:
            self.run_name = self._open(break_lock, run_name)
        # A save still in flight at interpreter exit is finished there (asyncsave). A
        # distributed save is a collective that every rank joins: it stays synchronous.
        self._background = (
            AsyncSaver(self, async_snapshot)
            if async_save and self.writer and self._group is None
            else None
        )

    def _open(self, break_lock: bool, run_name: str | None) -> str:
        if self._lock is not None:
            self._lock.acquire(break_lock=break_lock)
        try:
            if self._lock is not None:
                # A write-behind storage (Drive) replays a dead writer's staged uploads
                # once this writer holds the run: finish them before anything is listed
                # or restored, so a resume never starts from a checkpoint that exists
                # only in local staging (and is lost with the machine).
                self.storage.flush()
                self._remove_leftovers()
            return self._run_info(run_name)
        except BaseException:
            if self._lock is not None:
                self._lock.release()  # a failed constructor must not keep the run locked
            raise

    # -- context manager ------------------------------------------------------
    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Flush pending writes and release the run lock and signal handlers."""
        try:
            self.wait()
        finally:
            if self._background is not None:
                self._background.abandon()  # only when that wait was interrupted
            if self._signals is not None:
                self._signals.uninstall()
            if self._lock is not None:
                self._lock.release()
            self.storage.close()

    def wait(self) -> None:
        """Block until every save so far is durable on the storage. With
        ``async_save=True`` this commits the save in flight, and raises its error."""
        if self._background is not None:
            self._background.wait()
        self.storage.flush()
        self._fire_commits()

    # -- reading --------------------------------------------------------------
    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first."""
        return runmod.list_checkpoints(self.storage)

    def latest(self, *, verify: bool | None = None) -> CheckpointInfo | None:
        """The checkpoint ``restore(state)`` restores: the newest committed one whose
        files pass the check, newer damaged ones skipped with a warning naming them.

        The check is the restore's own read with ``verify`` (the manager's ``verify``,
        True by default): sizes, hashes and a decode of every file, so it reads them;
        sizes only without (cheap, but a damaged byte goes unnoticed until restore).
        """
        verify = self.verify if verify is None else verify
        # Newest first, each manifest read only when reached: constant cost in the
        # number of checkpoints (one listing, then the newest few).
        info, skipped = self._newest_valid(runmod.newest_first(self.storage), verify)
        for problem in skipped.values():
            warn(f"skipping {problem}")
        return info

    def _newest_valid(
        self, newest_first: Iterable[CheckpointInfo], verify: bool
    ) -> tuple[CheckpointInfo | None, dict[str, str]]:
        """The first of ``newest_first`` that passes the check, and the problem of each
        one before it, by name: one rule for ``latest()``, ``status()`` and resume."""
        skipped: dict[str, str] = {}
        for info in newest_first:
            try:
                if verify:  # the restore's own read: sizes, hashes and a full decode
                    runmod.read_state(self.storage, info, verify=True)
                else:
                    runmod.check_sizes(self.storage, info)
            except CorruptCheckpointError as exc:
                skipped[info.name] = str(exc)
                continue
            return info, skipped
        return None, skipped

    def best(self) -> CheckpointInfo | None:
        """The best checkpoint by ``best_metric`` (or the newest an EarlyStopping marked).

        A manager given no ``best_metric`` ranks by the one the run recorded, so that a
        read-only manager (and ``ckptkit ls``) finds the best the run's writer kept."""
        checkpoints = self.list()
        ranked = self._ranker(checkpoints).ranked(checkpoints)
        return ranked[0] if ranked else None

    def _ranker(self, checkpoints: list[CheckpointInfo]) -> KeepBestK:
        if self.best_metric is not None or not checkpoints:
            return self._best_ranker
        meta = checkpoints[-1].manifest.metadata
        metric, mode = meta.get("best_metric"), meta.get("mode", "min")
        if not isinstance(metric, str):
            return self._best_ranker
        return KeepBestK(1, metric, mode if mode in ("min", "max") else "min")

    def status(self, *, verify: bool | None = None) -> list[dict[str, Any]]:
        """Every checkpoint directory of the run, oldest first, as ``ckptkit ls`` shows it.

        Each row has the checkpoint's summary (``name``, ``path``, ``step``, ``epoch``,
        ``metrics``, ``created``, ``size``, ``files``) and:

        - ``status``: ``complete``, ``incomplete`` (no manifest: an interrupted save,
          never committed) or ``corrupt`` (a manifest that does not parse, or files that
          do not match it), with the ``problem`` named;
        - ``checked``: what was checked: ``"hash"`` (every byte: the newest
          checkpoints, down to the one a resume restores, when ``verify``), ``"sizes"``
          (the others) or ``"manifest"`` (a directory without a usable manifest);
        - ``latest``: exactly the checkpoint ``latest(verify=verify)`` returns;
        - ``best`` (and ``is_best``): the one ``best()`` ranks first among the complete.
        """
        verify = self.verify if verify is None else verify
        # Every row shows its manifest, so all are read here (once: one listing, one
        # read each); ``latest`` is the same rule on them as ``latest()``.
        names = runmod.checkpoint_names(self.storage)
        committed = runmod.scan(self.storage, names).committed
        latest, skipped = self._newest_valid(reversed(committed), verify)
        # With verify, the newest checkpoints down to latest were read in full.
        hashed = set(skipped) if verify else set()
        if verify and latest is not None:
            hashed.add(latest.name)
        by_name = {c.name: c for c in committed}
        rows: list[dict[str, Any]] = []
        complete: list[CheckpointInfo] = []
        for name in names:
            info = by_name.get(name)
            row = self._status_row(name, info, skipped.get(name))
            if info is not None:
                row["checked"] = "hash" if name in hashed else "sizes"
                if row["status"] == "complete":
                    complete.append(info)
            rows.append(row)
        ranked = self._ranker(complete).ranked(complete)
        best = ranked[0].name if ranked else None
        for row in rows:
            row["latest"] = latest is not None and row["name"] == latest.name
            row["best"] = row["is_best"] = row["name"] == best
        return rows

    def _status_row(
        self, name: str, info: CheckpointInfo | None, problem: str | None
    ) -> dict[str, Any]:
        parsed = parse_name(name) or (0, 0)
        row = runmod.status_row(name, self.storage.url_of(name), parsed[0], "manifest")
        row["problem"] = problem
        try:
            if info is None:
                # Read it again to name the problem: no manifest, or one that won't parse.
                runmod.read_manifest(self.storage, name)
                raise CorruptCheckpointError(f"{self.storage.url_of(name)}: not committed")
            row.update(info.summary())
            if problem is None:
                runmod.check_sizes(self.storage, info)  # the ones older than latest
        except CorruptCheckpointError as exc:
            problem = str(exc)
        if problem is not None:
            missing = info is None and not self.storage.exists(join_key(name, MANIFEST))
            row.update(status="incomplete" if missing else "corrupt", problem=problem)
        row["path"] = self.storage.url_of(name)
        return row

    # -- saving ---------------------------------------------------------------
    def maybe_save(
        self,
        step: int,
        state: Mapping[str, Any],
        metrics: Mapping[str, float] | None = None,
        *,
        epoch: int | None = None,
        epoch_end: bool = False,
    ) -> CheckpointInfo | None:
        """Save when a policy says so (interval, wall time, epoch end, signal, deadline).

        After a signal or near the time limit this saves whatever the interval and
        sets ``should_stop``, so the loop can exit cleanly (with ``async_save=True``, that
        save is committed before this returns).
        """
        if self._background is not None:
            self._background.poll()  # a finished background save: hooks and retention now
        now = time.monotonic()
        reasons = [r for t in self.triggers if (r := t.reason(step, now))]
        if epoch_end and self.save_on_epoch_end:
            reasons.append("epoch end")
        if self._group is not None:  # one decision for every rank (a signal, a clock)
            reasons = self._group.union(reasons, "save decision")
        if not reasons:
            return None
        urgent = [r for r in reasons if r.startswith("SIG") or r == "time limit"]
        info = self.save(step, state, metrics, epoch=epoch)
        late = [self._signals.received] if self._signals and self._signals.received else []
        if self._group is not None:
            late = self._group.union(late, "save decision")
        if not urgent and late:
            # The signal came while this checkpoint of the step just finished was being
            # written: stop on it rather than after one more step and save.
            urgent = late
        if urgent:
            self.stop_reason = urgent[0]
            self._stop_after_save = True
            if self._background is not None:
                self._background.wait()  # the loop exits next: the save must be there
        return info

    @property
    def should_stop(self) -> bool:
        """True once a signal or the time limit forced a save: leave the loop now."""
        return self._stop_after_save

    @property
    def exit_code(self) -> int:
        """0, or ``EXIT_RESUMABLE`` (75) when stopped early by a signal or time limit."""
        return EXIT_RESUMABLE if self._stop_after_save else 0

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        metrics: Mapping[str, float] | None = None,
        *,
        epoch: int | None = None,
    ) -> CheckpointInfo | None:
        """Save now. Returns the committed checkpoint (None on non-main ranks, unless
        the manager is distributed: then every rank calls it and gets it).

        Nothing existing is touched until the new checkpoint is committed; then
        retention deletes what no policy keeps.

        With ``async_save=True`` it first waits for the save in flight (raising its error,
        if it failed), returns once the snapshot is taken, and the checkpoint it returns
        (``name``, ``url``, ``step``, ``metrics``; no file entries yet) is committed in
        the background: durable after ``wait()``, ``close()`` or the next ``save``.
        """
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < MAX_STEP:
            raise ConfigError(f"step must be an int in [0, 10**12), got {step!r}")
        if self._group is not None:
            return distmod.save(self, self._group, step, state, metrics, epoch)
        if not self._writable("save"):
            return None
        if self._background is not None:
            self._background.wait()  # one save in flight at a time
        started = time.monotonic()
        self._pm.hook.ckptkit_before_save(manager=self, step=step, state=state)
        full = self._with_extra_state(state)
        sharded_keys = [k for k, v in full.items() if distmod.is_sharded(v)]
        if sharded_keys and distmod.rank_and_size()[1] > 1:  # alone, rank 0 has its shards only
            raise ConfigError(
                f"state[{sharded_keys[0]!r}] is a ShardedState, which every rank saves: "
                "construct the manager on every rank with distributed=True (the default)"
            )
        # The snapshot: ``collected`` references the live tensors (state_dict()s share
        # memory); everything after this point only reads it. An async save takes its
        # consistent copy of exactly this object.
        collected = collect_state(full)
        if epoch is None and isinstance(state.get("epoch"), int):
            epoch = int(state["epoch"])
        manifest = self._manifest(step, full, metrics, epoch)
        existing = self._committed_for_rotation()
        folder = None
        if sharded_keys:  # ShardedState: through DCP (a collective), always synchronous
            from ckptkit.formats import sharded

            folder = sharded.encode({k: collected.pop(k) for k in sharded_keys}, None)
        if self._background is not None and folder is None:
            return self._background.submit(collected, manifest, existing, started, full)
        info = self._write(collected, manifest, folder)
        self._finish(info, existing, started)
        return info

    def _manifest(
        self,
        step: int,
        full: Mapping[str, Any],
        metrics: Mapping[str, float] | None,
        epoch: int | None,
    ) -> Manifest:
        """The manifest of a save at ``step``, without its file entries (``_write``
        fills those in once the files are encoded)."""
        return Manifest(
            step=step,
            files={},
            entries={},
            epoch=epoch_value(epoch),
            metrics=metric_values(metrics or {}),
            is_best=_early_stopping_marks_best(full, step),
            config=self.config,
            config_hash=config_hash(self.config),
            metadata={
                "run_name": self.run_name,
                "best_metric": self.best_metric,
                "mode": self.mode,
                **self.metadata,
                # Restore checks an optimizer's/scheduler's class against it (reserved key).
                "state_classes": state_classes(full),
            },
            versions=versions(),
        )

    def _next_name(self, step: int) -> str:
        """The name of the next checkpoint at ``step``: its next free revision."""
        # Count every directory named for this step, committed or not: a damaged one
        # still occupies its name, and the new checkpoint must not collide with it. The
        # save's own listing (``_committed_for_rotation``, just before) is used when there
        # is one: one request less per save on an object store.
        listed, self._listing = self._listing, None
        if listed is None:
            listed = runmod.checkpoint_names(self.storage)
        taken = [p for n in listed if (p := parse_name(n)) and p[0] == step]
        return checkpoint_name(step, 1 + max((rev for _, rev in taken), default=-1))

    def _write(
        self,
        collected: Mapping[str, Any],
        manifest: Manifest,
        folder: Any = None,
        name: str | None = None,
        watch: native.Watch | None = None,
    ) -> CheckpointInfo:
        """Plan ``collected``'s files, pick the checkpoint's name (unless given: an async
        save names it when it is submitted) and commit it: the tensors are streamed from
        their own memory, hashed as they are written, manifest last. Reads ``collected``
        only; touches no committed checkpoint. ``folder``: already encoded sub-folder
        files (``formats.sharded.Folder``: DCP shards) to add. ``watch``: told as each
        tensor is streamed, and checked before the manifest (``native.Watch``)."""
        files, entries = native.encode(
            collected, watch
        )  # refuses what cannot be saved: no write yet
        layouts: dict[str, str] = {}
        if folder is not None:
            files.update(folder[0])
            entries.update(folder[1])
            layouts.update(folder[2])
        manifest = dataclasses.replace(manifest, entries=entries, layouts=layouts)
        # Refuse a manifest no reader would accept before writing anything (a NaN metric...).
        dataclasses.replace(manifest, files={f: _PLACEHOLDER for f in files}).to_bytes()
        name = name or self._next_name(manifest.step)
        wrote_run_info = self._write_run_info()
        written: list[Manifest] = []

        def final(entries: dict[str, FileEntry]) -> bytes:
            if watch is not None:
                watch.check()  # every data file is written: the last word before the commit
            written.append(dataclasses.replace(manifest, files=entries))
            return written[-1].to_bytes()

        try:
            self.strategy.commit(self.storage, name, files, final)
        except BaseException:
            if wrote_run_info:  # the first save failed: a run that never saved leaves no trace
                self._run_info_pending = True
                with contextlib.suppress(Exception):
                    self.storage.delete(RUN_INFO)
            raise
        return CheckpointInfo(name=name, url=self.storage.url_of(name), manifest=written[-1])

    def _committed_for_rotation(self) -> list[CheckpointInfo]:
        """The run's committed checkpoints, oldest first, as retention needs them (with
        their metrics): one listing of names, and a manifest read only for a name this
        manager has not seen yet (all of them the first time; later, only another
        process's). A name gone from the listing is forgotten. The writer holds the run
        lock, so a checkpoint it knows does not change under it."""
        names = runmod.checkpoint_names(self.storage)
        self._listing = names  # for _next_name, right after (the writer holds the lock)
        if self._known is None:
            self._known, self._unusable = {}, set()
        new = [n for n in names if n not in self._known and n not in self._unusable]
        found = runmod.scan(self.storage, new)
        self._known.update((c.name, c) for c in found.committed)
        self._unusable.update(set(new) - {c.name for c in found.committed})
        listed = set(names)
        for name in [n for n in self._known if n not in listed]:
            del self._known[name]
        self._unusable &= listed
        return [self._known[n] for n in names if n in self._known]

    def _finish(
        self,
        info: CheckpointInfo,
        existing: list[CheckpointInfo],
        started: float,
        *,
        tell_triggers: bool = True,
    ) -> None:
        """After a commit: hooks, triggers, retention (``existing``: the committed
        checkpoints listed before the save; an async save told the triggers already)."""
        if self._known is not None:
            self._known[info.name] = info
        self._pm.hook.ckptkit_after_save(manager=self, info=info)
        self._uncommitted.append(info)
        if not getattr(self.storage, "write_behind", False):
            self._fire_commits()
        for trigger in self.triggers if tell_triggers else ():
            trigger.saved(info.step, time.monotonic())
        self._rotate([*existing, info], saved=info)
        if self._deadline is not None:
            self._deadline.save_time = max(self._deadline.save_time, time.monotonic() - started)

    def _fire_commits(self) -> None:
        while self._uncommitted:
            self._pm.hook.ckptkit_after_commit(manager=self, info=self._uncommitted.pop(0))

    def _write_run_info(self) -> bool:
        """Write ``run.json`` with the run's first save, before its commit: a failure
        (full disk) then raises a StorageError with nothing saved, never after a
        checkpoint committed. Returns whether it wrote it."""
        if not self._run_info_pending:
            return False
        data = json.dumps({"run_name": self.run_name, "created": time.time()})
        try:
            self.write_file(RUN_INFO, data)
        except BaseException:
            with contextlib.suppress(Exception):
                self.storage.delete(RUN_INFO)  # no empty or partial run.json left behind
            raise
        self._run_info_pending = False
        return True

    def _rotate(self, checkpoints: list[CheckpointInfo], saved: CheckpointInfo) -> None:
        """Delete what retention does not keep. ``saved`` has committed already: a
        deletion that fails (full disk, a busy or read-only directory) is a warning,
        never an exception that would read as "nothing was saved"."""
        protected = {self.restored_from.name} if self.restored_from else set()
        newest_rev = {c.step: c.name for c in checkpoints}
        current = [c for c in checkpoints if newest_rev[c.step] == c.name]
        # Rank only current revisions: an older revision of the same step (which wins
        # a tie as the older checkpoint) must not outlive the save that replaced it.
        ranked = self._best_ranker.ranked(current)
        if ranked:
            protected.add(ranked[0].name)  # never delete the best
        superseded = [
            c for c in checkpoints if newest_rev[c.step] != c.name and c.name not in protected
        ]
        for info in superseded + select_deletions(current, self.retention, protected):
            try:
                self.delete(info)
            except OSError as exc:  # StorageError included
                warn(
                    f"{saved.name} was saved, but rotation could not delete {info.name} "
                    f"({exc}); it stays until a later save or writer removes it"
                )

    def delete(self, info: CheckpointInfo) -> bool:
        """Delete one checkpoint, manifest first (so a half-deleted one is never read).
        Returns False when a ``ckptkit_before_delete`` hook vetoed it."""
        if not self._writable("delete"):
            return False
        if False in self._pm.hook.ckptkit_before_delete(manager=self, info=info):
            return False
        if self._known is not None:  # before: a failed delete leaves it half-deleted
            self._known.pop(info.name, None)
        self.storage.delete(join_key(info.name, MANIFEST))
        self.storage.delete(info.name, recursive=True)
        return True

    def _writable(self, action: str) -> bool:
        """False on non-main ranks (they skip writes); a read-only manager refuses."""
        if self.readonly:
            raise ConfigError(f"{self.url}: cannot {action}: this manager is readonly=True")
        return self.writer

    def _remove_leftovers(self) -> None:
        for name in self.strategy.leftovers(self.storage, self.storage.listdir("")):
            try:
                self.storage.delete(name, recursive=True)
            except OSError as exc:  # StorageError included
                # Invisible to readers anyway: an undeletable leftover (a busy or
                # read-only directory) must not stop the run from being opened.
                warn(f"could not remove the leftover {name} of an interrupted save ({exc})")

    def write_file(self, name: str, data: bytes | str) -> None:
        """Write a run file (logs, metrics, plots) next to the checkpoints; a symlink of
        that name is replaced, never written through."""
        if self._writable("write a file"):
            self.storage.write_bytes(name, data.encode() if isinstance(data, str) else data)

    def read_file(self, name: str) -> bytes | None:
        """A run file written with ``write_file``, or None (also, with a warning, when it
        is a symlink or not a regular file: nothing is read through a link in the run)."""
        try:
            return self.storage.read_bytes(name)
        except FileNotFoundError:
            return None
        except CorruptCheckpointError as exc:
            warn(f"ignoring {exc}")
            return None

    def _run_info(self, run_name: str | None) -> str:
        self._run_info_pending = False
        raw = self.read_file(RUN_INFO)
        if raw:
            try:
                name = json.loads(raw)["run_name"]
            except (ValueError, KeyError, TypeError, IndexError, RecursionError):
                name = None  # a damaged run.json: the next save writes a fresh one
            if isinstance(name, str):
                return name
        base = self.url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "run"
        # Written with the first save, so a run that never saved leaves no trace.
        self._run_info_pending = True
        return run_name or f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"

    # -- restoring ------------------------------------------------------------
    def restore(
        self,
        state: MutableMapping[str, Any],
        which: str | int = "latest",
        *,
        verify: bool | None = None,
        force: bool = False,
        trust: bool = False,
    ) -> ResumeResult:
        """Load a checkpoint into ``state`` in place; return a ``ResumeResult`` saying
        whether it resumed, from which checkpoint and step (an int-like: its step).

        ``which``: ``"latest"`` (newest valid; corrupt ones are skipped with a warning
        naming them), ``"best"``, a step number, a checkpoint name in this run, or the
        URL/path of any checkpoint or run we read (native or legacy). When the run has
        no checkpoint and ``which`` is ``"latest"``, nothing is loaded and the result
        has ``resumed=False``.
        """
        verify = self.verify if verify is None else verify
        if self._background is not None:
            self._background.settle()  # an async save may still be copying the state
        full = self._with_extra_state(state)
        group = self._group
        if group is not None:  # rank 0 reads and verifies; every rank gets what it read
            loaded = group.on_main(lambda: self._load(which, verify=verify, trust=trust), "restore")
            return self._apply(state, full, loaded, force)
        # A model's weights may be lent as views of the mapped files: its load_state_dict
        # copies them into the parameters, the one copy of a restore; an optimizer's are
        # copied into the state tensors it holds (storage/mapping.py, Lending.adopt).
        modules = {k: v for k, v in full.items() if isinstance(v, torch.nn.Module)}
        optimizers = [k for k, v in full.items() if isinstance(v, torch.optim.Optimizer)]
        lending = Lending([*modules, *optimizers])
        try:
            loaded = self._load(which, verify=verify, trust=trust, lending=lending)
            result = self._apply(state, full, loaded, force, lending.still_valid, lending.adopt)
            lending.settle(modules.values())
            return result
        finally:
            loaded = None
            lending.close()

    def _apply(
        self,
        state: MutableMapping[str, Any],
        full: dict[str, Any],
        loaded: tuple[CheckpointInfo | None, Loaded] | None,
        force: bool,
        still_valid: Any = None,
        adopt: Any = None,
    ) -> ResumeResult:
        group = self._group
        if loaded is None:
            return ResumeResult(False)
        info, data = loaded
        if not force:
            self._check_config(data)
        meta = data.meta.get("metadata")
        classes = meta.get("state_classes") if isinstance(meta, Mapping) else None
        saved = distmod.for_this_rank(full, data, group)  # this rank's RNG and position
        notes = distmod.restore_apply(
            group,
            lambda: apply_state(
                full,
                saved,
                data.source,
                classes=classes,
                force=force,
                still_valid=still_valid,
                adopt=adopt,
            ),
        )
        for key in state:
            if not isinstance(state[key], torch.nn.Module):
                state[key] = full[key]  # plain values were replaced in ``full``
        said: set[str] = set()
        for note in data.notes + notes:
            topic = note.split(":", 1)[0]  # a legacy reader and apply_state may say the same
            if topic not in said:
                said.add(topic)
                warn(f"restored {data.source}: {note}")
        if info is not None:
            self.restored_from = info
            self._pm.hook.ckptkit_after_restore(manager=self, info=info, state=state)
        return ResumeResult(True, data.step, info, data.source)

    def resume(
        self,
        state: MutableMapping[str, Any],
        resume: str = "auto",
        *,
        overwrite: bool = False,
        force: bool = False,
        trust: bool = False,
    ) -> ResumeResult:
        """The ``--resume`` semantics every training command shares; returns a
        ``ResumeResult`` (``resumed=False`` when starting fresh).

        - ``"latest"``: the newest valid checkpoint of this run; error if there is none.
        - ``"auto"``: ``latest`` if the run has a checkpoint, else start fresh.
        - ``"never"``: start fresh; refuses a run that already has checkpoints unless
          ``overwrite=True``, which deletes them (they would otherwise outrank the new
          run's checkpoints as "latest").
        - anything else: the path/URL of a checkpoint or run (native or legacy), or a
          step number / checkpoint name of this run.
        """
        mode = str(resume)
        if mode == "never":
            committed = self._committed_names()
            if committed and not overwrite:
                raise ConfigError(
                    f"{self.url} already has {len(committed)} checkpoint(s) (newest "
                    f"{committed[-1]}): resume with resume='latest' or 'auto', use another run, "
                    "or pass overwrite=True to delete them and start fresh"
                )
            self._delete_all(committed)
            return ResumeResult(False)
        if mode in ("latest", "auto"):
            result = self.restore(state, "latest", force=force)
            if result.resumed:
                return result
            damaged = self._committed_names()
            if damaged:
                # Starting fresh would bury them under new checkpoints: the user decides.
                shown = ", ".join(damaged[:8]) + (
                    f" and {len(damaged) - 8} more" if len(damaged) > 8 else ""
                )
                raise CorruptCheckpointError(
                    f"{self.url}: every committed checkpoint is damaged ({shown}), so there is "
                    "nothing to resume from: check them with `ckptkit verify`, or pass "
                    "resume='never', overwrite=True to delete them and start over"
                )
            if mode == "latest":
                raise CheckpointNotFoundError(
                    f"{self.url}: no checkpoint to resume from; use resume='auto' to start fresh"
                )
            return result
        return self.restore(state, mode, force=force, trust=trust)

    def _committed_names(self) -> list[str]:
        """Checkpoint directories with a manifest, oldest first, whether it parses or
        not: an interrupted save (no manifest) is a leftover, not a checkpoint."""
        names = runmod.checkpoint_names(self.storage)  # a fresh listing
        missing = set(without_manifest(self.storage, names))  # one more (find) on gs://
        return [n for n in names if n not in missing]

    def _delete_all(self, names: list[str]) -> None:
        """Delete these checkpoints, the damaged ones (no manifest that parses) too."""
        committed = {c.name: c for c in runmod.list_checkpoints(self.storage, quiet=True)}
        for name in names:
            if name in committed:
                self.delete(committed[name])
            elif self._writable("delete"):
                self.storage.delete(join_key(name, MANIFEST))
                self.storage.delete(name, recursive=True)

    def _load(
        self, which: str | int, *, verify: bool, trust: bool, lending: Lending | None = None
    ) -> tuple[CheckpointInfo | None, Loaded] | None:
        if which == "latest":  # newest first: only the manifests down to a valid one
            for info in runmod.newest_first(self.storage):
                try:
                    return info, self._read(info, verify, lending)
                except CorruptCheckpointError as exc:
                    warn(f"skipping {exc}")
                    if lending is not None:
                        lending.close()  # what the damaged one mapped
            return None
        if which == "best":
            best = self.best()
            if best is None:
                raise CheckpointNotFoundError(
                    f"{self.url}: no best checkpoint (no metric recorded yet)"
                )
            return best, self._read(best, verify, lending)
        if isinstance(which, int) or str(which).isdigit() or parse_name(str(which)):
            info = runmod.find_checkpoint(self.storage, which, self.url)
            return info, self._read(info, verify, lending)
        own = self._own_checkpoint(str(which))
        if own is not None:  # a path into this run: protect it from rotation like any other
            return own, self._read(own, verify, lending)
        from ckptkit.reader import read_checkpoint

        return None, read_checkpoint(str(which), verify=verify, trust=trust)

    def _own_checkpoint(self, url: str) -> CheckpointInfo | None:
        """The committed checkpoint of this run that ``url`` names, if any (only its
        manifest is read)."""

        def where(u: str) -> str:
            return (
                os.path.realpath(u.removeprefix("file://")) if scheme_of(u) in ("", "file") else u
            )

        target = where(url.rstrip("/"))
        names = runmod.checkpoint_names(self.storage)
        name = next((n for n in names if where(self.storage.url_of(n)) == target), None)
        if name is None:
            return None
        return next(runmod.newest_first(self.storage, [name], quiet=True), None)

    def _read(self, info: CheckpointInfo, verify: bool, lending: Lending | None = None) -> Loaded:
        return runmod.read(self.storage, info, verify=verify, lending=lending)

    def _check_config(self, data: Loaded) -> None:
        saved = data.meta.get("config")
        if self.config is None or saved is None or config_hash(saved) == config_hash(self.config):
            return
        keys = sorted(
            k for k in set(saved) | set(self.config) if saved.get(k) != self.config.get(k)
        )
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {self.config.get(k)!r}" for k in keys[:6])
        raise IncompatibleCheckpointError(
            f"{data.source} was saved with a different training config ({diffs}); "
            "resume with the same settings or pass force=True"
        )

    def _with_extra_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        full = dict(state)
        if self.trainable_only:
            for key, obj in state.items():
                if isinstance(obj, torch.nn.Module):
                    full[key] = self._trainable_view(obj)
        for extra in self._pm.hook.ckptkit_extra_state(manager=self):
            for key, obj in (extra or {}).items():
                full.setdefault(key, obj)
        return full

    def _trainable_view(self, model: torch.nn.Module) -> Any:
        from ckptkit.state.trainable import TrainableOnly

        view = self._trainable.get(id(model))
        if view is None or view.model is not model:
            view = self._trainable[id(model)] = TrainableOnly(model)
        return view


def _is_main_process() -> bool:
    return distmod.rank_and_size()[0] == 0


def _dist_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _early_stopping_marks_best(state: Mapping[str, Any], step: int) -> bool:
    from ckptkit.state.early_stopping import EarlyStopping

    return any(isinstance(v, EarlyStopping) and v.best_step == step for v in state.values())
