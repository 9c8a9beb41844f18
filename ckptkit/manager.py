"""CheckpointManager: save / restore / latest / best / list — orchestration only.

Encoding lives in ``formats``, commit in ``atomic``, what to keep and when to save in
``policies``, bytes in ``storage``; this module wires them together and calls hooks.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch

from ckptkit import run as runmod
from ckptkit.atomic import CommitStrategy, get_strategy
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
from ckptkit.manifest import MANIFEST, Manifest, checkpoint_name, config_hash, parse_name, versions
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
from ckptkit.storage.registry import open_storage, scheme_of

# Exit code for "stopped early on purpose (signal or time limit), resume me":
# EX_TEMPFAIL from sysexits.h, which schedulers' retry loops can test for.
EXIT_RESUMABLE = 75
RUN_INFO = "run.json"


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
    ) -> None:
        if mode not in ("min", "max"):
            raise ConfigError(f"mode must be 'min' or 'max', got {mode!r}")
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

        self.readonly = readonly
        self.writer = not readonly and _is_main_process()
        self._lock = RunLock(self.storage) if self.writer else None
        if self._lock is not None:
            self._lock.acquire(break_lock=break_lock)
        try:
            if self._lock is not None:
                self._remove_leftovers()
            self.run_name = self._run_info(run_name)
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
            if self._signals is not None:
                self._signals.uninstall()
            if self._lock is not None:
                self._lock.release()
            self.storage.close()

    def wait(self) -> None:
        """Block until every save so far is durable on the storage."""
        self.storage.flush()
        self._fire_commits()

    # -- reading --------------------------------------------------------------
    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first."""
        return runmod.list_checkpoints(self.storage)

    def latest(self) -> CheckpointInfo | None:
        """The newest checkpoint whose files are all present with their recorded sizes."""
        for info in reversed(self.list()):
            try:
                runmod.check_sizes(self.storage, info)
                return info
            except CorruptCheckpointError as exc:
                warn(f"skipping {exc}")
        return None

    def best(self) -> CheckpointInfo | None:
        """The best checkpoint by ``best_metric`` (or the newest an EarlyStopping marked)."""
        ranked = self._best_ranker.ranked(self.list())
        return ranked[0] if ranked else None

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
        sets ``should_stop``, so the loop can exit cleanly.
        """
        now = time.monotonic()
        reasons = [r for t in self.triggers if (r := t.reason(step, now))]
        if epoch_end and self.save_on_epoch_end:
            reasons.append("epoch end")
        if not reasons:
            return None
        urgent = [r for r in reasons if r.startswith("SIG") or r == "time limit"]
        info = self.save(step, state, metrics, epoch=epoch)
        if not urgent and self._signals is not None and self._signals.received:
            # The signal came while this checkpoint of the step just finished was being
            # written: stop on it rather than after one more step and save.
            urgent = [self._signals.received]
        if urgent:
            self.stop_reason = urgent[0]
            self._stop_after_save = True
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
        """Save now. Returns the committed checkpoint (None on non-main ranks).

        Nothing existing is touched until the new checkpoint is committed; then
        retention deletes what no policy keeps.
        """
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ConfigError(f"step must be a non-negative int, got {step!r}")
        if not self._writable("save"):
            return None
        started = time.monotonic()
        self._pm.hook.ckptkit_before_save(manager=self, step=step, state=state)
        full = self._with_extra_state(state)
        collected = collect_state(full)
        files, entries = native.encode(collected)
        if epoch is None and isinstance(state.get("epoch"), int):
            epoch = int(state["epoch"])
        manifest = Manifest(
            step=step,
            files=native.file_entries(files),
            entries=entries,
            epoch=epoch,
            metrics={k: float(v) for k, v in (metrics or {}).items()},
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
        existing = self.list()
        # Count every directory named for this step, committed or not: a damaged one
        # still occupies its name, and the new checkpoint must not collide with it.
        taken = [p for n in self.storage.listdir("") if (p := parse_name(n)) and p[0] == step]
        name = checkpoint_name(step, 1 + max((rev for _, rev in taken), default=-1))
        self.strategy.commit(self.storage, name, files, manifest.to_bytes())
        if self._run_info_pending:
            self.write_file(
                RUN_INFO, json.dumps({"run_name": self.run_name, "created": time.time()})
            )
            self._run_info_pending = False
        info = CheckpointInfo(name=name, url=self.storage.url_of(name), manifest=manifest)
        self._pm.hook.ckptkit_after_save(manager=self, info=info)
        self._uncommitted.append(info)
        if not getattr(self.storage, "write_behind", False):
            self._fire_commits()
        for trigger in self.triggers:
            trigger.saved(step, time.monotonic())
        self._rotate([*existing, info])
        if self._deadline is not None:
            self._deadline.save_time = max(self._deadline.save_time, time.monotonic() - started)
        return info

    def _fire_commits(self) -> None:
        while self._uncommitted:
            self._pm.hook.ckptkit_after_commit(manager=self, info=self._uncommitted.pop(0))

    def _rotate(self, checkpoints: list[CheckpointInfo]) -> None:
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
            self.delete(info)

    def delete(self, info: CheckpointInfo) -> bool:
        """Delete one checkpoint, manifest first (so a half-deleted one is never read).
        Returns False when a ``ckptkit_before_delete`` hook vetoed it."""
        if not self._writable("delete"):
            return False
        if False in self._pm.hook.ckptkit_before_delete(manager=self, info=info):
            return False
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
            self.storage.delete(name, recursive=True)

    def write_file(self, name: str, data: bytes | str) -> None:
        """Write a run file (logs, metrics, plots) next to the checkpoints."""
        if self._writable("write a file"):
            self.storage.write_bytes(name, data.encode() if isinstance(data, str) else data)

    def read_file(self, name: str) -> bytes | None:
        """A run file written with ``write_file``, or None."""
        try:
            return self.storage.read_bytes(name)
        except FileNotFoundError:
            return None

    def _run_info(self, run_name: str | None) -> str:
        self._run_info_pending = False
        raw = self.read_file(RUN_INFO)
        if raw:
            try:
                return str(json.loads(raw)["run_name"])
            except (ValueError, KeyError):
                pass
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
        full = self._with_extra_state(state)
        loaded = self._load(which, verify=verify, trust=trust)
        if loaded is None:
            return ResumeResult(False)
        info, data = loaded
        if not force:
            self._check_config(data)
        meta = data.meta.get("metadata")
        classes = meta.get("state_classes") if isinstance(meta, Mapping) else None
        notes = apply_state(full, data.state, data.source, classes=classes, force=force)
        for key in state:
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
            existing = self.list()
            if existing and not overwrite:
                raise ConfigError(
                    f"{self.url} already has {len(existing)} checkpoint(s) (latest step "
                    f"{existing[-1].step}): resume with resume='latest' or resume='auto', "
                    "use another run, or pass overwrite=True to delete them and start fresh"
                )
            for info in existing:
                self.delete(info)
            return ResumeResult(False)
        if mode == "latest":
            result = self.restore(state, "latest", force=force)
            if not result.resumed:
                raise CheckpointNotFoundError(
                    f"{self.url}: no valid checkpoint to resume from; use resume='auto' to "
                    "start fresh"
                )
            return result
        if mode == "auto":
            return self.restore(state, "latest", force=force)
        return self.restore(state, mode, force=force, trust=trust)

    def _load(
        self, which: str | int, *, verify: bool, trust: bool
    ) -> tuple[CheckpointInfo | None, Loaded] | None:
        checkpoints = self.list()
        if which == "latest":
            for info in reversed(checkpoints):
                try:
                    return info, self._read(info, verify)
                except CorruptCheckpointError as exc:
                    warn(f"skipping {exc}")
            return None
        if which == "best":
            best = self.best()
            if best is None:
                raise CheckpointNotFoundError(
                    f"{self.url}: no best checkpoint (no metric recorded yet)"
                )
            return best, self._read(best, verify)
        if isinstance(which, int) or str(which).isdigit() or parse_name(str(which)):
            info = runmod.find(checkpoints, which, self.url)
            return info, self._read(info, verify)
        own = self._own_checkpoint(checkpoints, str(which))
        if own is not None:  # a path into this run: protect it from rotation like any other
            return own, self._read(own, verify)
        from ckptkit.reader import read_checkpoint

        return None, read_checkpoint(str(which), verify=verify, trust=trust)

    def _own_checkpoint(self, checkpoints: list[CheckpointInfo], url: str) -> CheckpointInfo | None:
        def where(u: str) -> str:
            return (
                os.path.realpath(u.removeprefix("file://")) if scheme_of(u) in ("", "file") else u
            )

        target = where(url.rstrip("/"))
        return next((c for c in checkpoints if where(c.url) == target), None)

    def _read(self, info: CheckpointInfo, verify: bool) -> Loaded:
        return runmod.read(self.storage, info, verify=verify)

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
        for extra in self._pm.hook.ckptkit_extra_state(manager=self):
            for key, obj in (extra or {}).items():
                full.setdefault(key, obj)
        return full


def _is_main_process() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _early_stopping_marks_best(state: Mapping[str, Any], step: int) -> bool:
    from ckptkit.state.early_stopping import EarlyStopping

    return any(isinstance(v, EarlyStopping) and v.best_step == step for v in state.values())
