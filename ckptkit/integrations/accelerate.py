"""An ``accelerate.Accelerator``'s whole state saved and restored as a ckptkit checkpoint.

    from ckptkit.integrations.accelerate import CkptkitAccelerate
    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    accelerator.register_for_checkpointing(my_counter)
    ck = CkptkitAccelerate(accelerator, "gs://bucket/run1", keep_last=3, save_every_steps=500)
    step = ck.resume().step or 0          # newest valid checkpoint; 0 on a fresh run
    while step < max_steps:
        for batch in ck.loader(loader):   # resumes mid-epoch at the next batch
            ...
            step += 1
            ck.maybe_save(step, metrics={"loss": loss.item()})

What a caller may rely on:

- A checkpoint is an ordinary native ckptkit checkpoint written through
  ``CheckpointManager`` (manifest last, verified on read, any storage URL, ckptkit
  retention). Its entries are named as ckptkit reads accelerate's own ``save_state``
  folders (ckptkit/formats/accelerate.py): ``model``, ``model_1``... (each prepared model's
  *unwrapped* state dict), ``optimizer``..., ``scheduler``..., ``custom_checkpoint_0``...
  (the ``register_for_checkpointing`` objects, in order), ``scaler`` (the grad scaler, if
  any), plus ``rng`` (python, numpy, torch and CUDA RNGs of *every* process),
  ``dataloader``, ``dataloader_1``... (each prepared loader's position) and
  ``accelerator`` (``accelerator.step``, the gradient-accumulation counter). So
  ``resume(<an accelerate save_state folder>)`` restores what that folder holds too.
- ``resume()`` is ``CheckpointManager.resume`` on that state: ``"auto"`` (the default)
  takes the newest valid checkpoint, damaged ones skipped, or starts fresh. Call it on
  every process, after ``prepare`` and ``register_for_checkpointing``; each process gets
  its own RNG back (rank 0's, with a warning, when the number of processes changed).
- Data position: iterate each prepared loader through ``ck.loader(loader)``. It counts
  the batches handed to the loop, and snapshots at each epoch start the generators the
  epoch's order is drawn from (torch's global RNG and the sampler's generator). After a
  resume, the first epoch replays that start from the snapshot (same shuffle, same draws),
  skips the batches already consumed with ``accelerator.skip_first_batches``, and puts
  the RNGs back as they were at the checkpoint: the loop sees exactly the batches and
  random draws of an uninterrupted run. A loader iterated directly still has its epoch
  (``loader.iteration``) saved and restored, but restarts that epoch from its first batch.
- ``save`` and ``maybe_save`` are called on every process: with several, the processes'
  RNG and loader states are gathered to the main one (one ``gather_object``), it writes,
  and all wait for the commit. ``maybe_save`` with several processes gathers at every
  call and follows the main process's decision.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import torch

from ckptkit.errors import (
    ConfigError,
    IncompatibleCheckpointError,
    MissingDependencyError,
    install_hint,
)

try:
    import accelerate
    from accelerate.utils import broadcast_object_list, gather_object
except ImportError:  # pragma: no cover - exercised in a subprocess without accelerate
    raise MissingDependencyError(
        "ckptkit.integrations.accelerate needs accelerate: "
        + install_hint("accelerate", "accelerate")
    ) from None

from ckptkit.formats.accelerate import state_name
from ckptkit.manager import EXIT_RESUMABLE, CheckpointManager, ResumeResult
from ckptkit.run import CheckpointInfo, warn
from ckptkit.state.rng import RNGState

__all__ = ["CkptkitAccelerate"]


def _gathered(accelerator: accelerate.Accelerator, value: Any) -> list[Any]:
    """``value`` of every process, by rank (a collective: every process must call it)."""
    if accelerator.num_processes == 1:
        return [value]
    return list(gather_object([value]))


class _ProcessRNG:
    """Every process's RNGs: ``{"ranks": [RNGState().state_dict() per rank]}``.

    ``state_dict`` returns what ``CkptkitAccelerate`` gathered just before the save (it is
    called on the main process only, where no collective may run)."""

    def __init__(self, accelerator: accelerate.Accelerator) -> None:
        self.accelerator = accelerator
        self.rng = RNGState()
        self.ranks: list[dict[str, Any]] | None = None

    def gather(self) -> None:
        self.ranks = _gathered(self.accelerator, self.rng.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": self.ranks if self.ranks is not None else [self.rng.state_dict()]}

    def _own(self, state: Any) -> Any:
        # A bare RNGState layout: what ckptkit reads from an accelerate save_state folder.
        if isinstance(state, Mapping) and "ranks" not in state:
            return state
        ranks = state.get("ranks") if isinstance(state, Mapping) else None
        if not isinstance(ranks, list) or not ranks:
            raise IncompatibleCheckpointError(
                "the checkpoint's rng has no per-process RNG states; it was not written by "
                "ckptkit.integrations.accelerate"
            )
        rank = self.accelerator.process_index
        return ranks[rank] if len(ranks) == self.accelerator.num_processes else ranks[0]

    def check_state_dict(self, state: Any) -> None:
        self.rng.check_state_dict(self._own(state))

    def load_state_dict(self, state: Any) -> None:
        ranks = state.get("ranks") if isinstance(state, Mapping) else None
        if isinstance(ranks, list) and len(ranks) != self.accelerator.num_processes:
            warn(
                f"the checkpoint holds RNG states of {len(ranks)} process(es), this run has "
                f"{self.accelerator.num_processes}: every process restores rank 0's"
            )
        self.rng.load_state_dict(self._own(state))


def _epoch_rng(dataloader: Any) -> dict[str, Any]:
    """What an epoch's order is drawn from: torch's global RNG (a loader without its own
    generator draws its sampler's seed and worker seeds from it) and the sampler's own
    generator, if any."""
    gen = _sampler_generator(dataloader)
    return {"torch": torch.get_rng_state(), "generator": gen.get_state() if gen else None}


def _sampler_generator(dataloader: Any) -> torch.Generator | None:
    gen = getattr(dataloader, "synchronized_generator", None)
    if gen is None:
        sampler = getattr(getattr(dataloader, "batch_sampler", None), "sampler", None)
        gen = getattr(sampler, "generator", None)
    return gen if isinstance(gen, torch.Generator) else None


class _TrackedLoader:
    """A prepared DataLoader whose position (epoch, batches handed out, the RNGs at the
    epoch's start) is state; see the module docstring."""

    def __init__(self, accelerator: accelerate.Accelerator, dataloader: Any) -> None:
        self.accelerator = accelerator
        self.dataloader = dataloader
        self.batches = 0  # of the current epoch, handed to the loop
        self._start: dict[str, Any] | None = None  # _epoch_rng at this epoch's start
        self._pending: tuple[int, dict[str, Any] | None] | None = None  # set by a restore
        self.ranks: list[dict[str, Any] | None] | None = None  # gathered for a save
        self._iterating = 0  # bumped per iter(): an abandoned iterator stops counting

    def __len__(self) -> int:
        return len(self.dataloader)

    def __getattr__(self, name: str) -> Any:
        if name == "dataloader":  # not set yet: never recurse
            raise AttributeError(name)
        return getattr(self.dataloader, name)  # batch_size, dataset, set_epoch...

    def set_epoch(self, epoch: int) -> None:
        """``DataLoaderShard.set_epoch``; another epoch than the one in progress (or
        resumed) starts at its first batch."""
        if epoch != getattr(self.dataloader, "iteration", epoch):
            self._pending, self.batches, self._start = None, 0, None
            self._iterating += 1
        self.dataloader.set_epoch(epoch)

    def __iter__(self) -> Any:
        self._iterating += 1
        pending, self._pending = self._pending, None
        if pending is not None and pending[0]:
            return self._resumed(self._iterating, *pending)
        return self._epoch(self._iterating)

    def _epoch(self, me: int) -> Any:
        self.batches, self._start = 0, _epoch_rng(self.dataloader)
        yield from self._counted(me, iter(self.dataloader))

    def _counted(self, me: int, batches: Any) -> Any:
        for batch in batches:
            if me == self._iterating:
                self.batches += 1
            yield batch
        if me == self._iterating:
            self.batches, self._start = 0, None

    def _resumed(self, me: int, skip: int, start: dict[str, Any] | None) -> Any:
        """The resumed epoch: its order drawn again from the RNGs of its start, the first
        ``skip`` batches skipped, the RNGs then put back as the checkpoint left them."""
        dl = self.dataloader
        skipping = self.accelerator.skip_first_batches(dl, skip)
        self.batches, self._start = skip, start
        batches = iter(skipping)
        now = torch.get_rng_state()
        gen = _sampler_generator(dl)
        if start is not None:
            torch.set_rng_state(start["torch"])
            if gen is not None and start.get("generator") is not None:
                gen.set_state(start["generator"])
        try:
            # The epoch's order (and the loader's worker seed) is drawn on the first batch;
            # the sampler's generator stays where that draw left it, as in the original run.
            first = [next(batches)]
        except StopIteration:
            first = []
        finally:
            torch.set_rng_state(now)
        yield from self._counted(me, itertools.chain(first, batches))
        # The skipping copy counted the finished epoch, except when it had no batch left.
        dl.iteration = skipping.iteration + (0 if first else 1)

    def gather(self) -> None:
        self.ranks = _gathered(self.accelerator, self._start)

    def state_dict(self) -> dict[str, Any]:
        ranks = self.ranks if self.ranks is not None else [self._start]
        return {
            "iteration": int(getattr(self.dataloader, "iteration", 0)),
            "batches": self.batches,
            "length": len(self.dataloader),
            "epoch_rng": ranks if self.batches else None,
        }

    def check_state_dict(self, state: Any) -> None:
        if not isinstance(state, Mapping) or not {"iteration", "batches", "length"} <= set(state):
            raise IncompatibleCheckpointError(
                "loader state lacks iteration/batches/length; it was not written by "
                "ckptkit.integrations.accelerate"
            )
        if state["length"] != len(self.dataloader):
            raise IncompatibleCheckpointError(
                f"the checkpoint's loader had {state['length']} batches per epoch, this one "
                f"has {len(self.dataloader)}; resume with the same dataset, batch size and "
                "number of processes to continue the epoch"
            )
        for key in ("iteration", "batches"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise IncompatibleCheckpointError(
                    f"loader state has {key}={value!r}, expected an int >= 0; it is corrupt"
                )
        if state["batches"] > state["length"]:
            raise IncompatibleCheckpointError(
                f"loader state is at batch {state['batches']} of an epoch of "
                f"{state['length']}; it is corrupt"
            )
        ranks = state.get("epoch_rng")
        if ranks is not None and not (
            isinstance(ranks, list) and all(r is None or _is_epoch_rng(r) for r in ranks)
        ):
            raise IncompatibleCheckpointError(
                "loader state's epoch_rng is not a list of RNG snapshots; it is corrupt"
            )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.check_state_dict(state)
        ranks = state.get("epoch_rng")
        start = None
        if isinstance(ranks, list) and ranks:
            rank = self.accelerator.process_index
            start = ranks[rank] if rank < len(ranks) else ranks[0]
        self.dataloader.iteration = int(state["iteration"])
        self.batches = int(state["batches"])
        self._start = start
        self._pending = (self.batches, start)
        self._iterating += 1  # an iterator started before the restore stops counting


def _is_epoch_rng(value: Any) -> bool:
    def rng(t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1

    return (
        isinstance(value, Mapping)
        and rng(value.get("torch"))
        and (value.get("generator") is None or rng(value.get("generator")))
    )


class _AcceleratorCounters:
    """``accelerator.step``: where gradient accumulation is inside its cycle."""

    def __init__(self, accelerator: accelerate.Accelerator) -> None:
        self.accelerator = accelerator

    def state_dict(self) -> dict[str, Any]:
        return {"step": int(self.accelerator.step)}

    def check_state_dict(self, state: Any) -> None:
        step = state.get("step") if isinstance(state, Mapping) else None
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise IncompatibleCheckpointError(
                f"accelerator state has step={step!r}, expected an int >= 0; it is corrupt"
            )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.accelerator.step = int(state["step"])


class CkptkitAccelerate:
    """Checkpoints of ``accelerator``'s whole state in the ckptkit run at ``url``
    (module docstring). ``manager_kwargs`` go to ``CheckpointManager`` (``keep_last``,
    ``keep_best``, ``best_metric``, ``save_every_steps``, ``handle_signals``...)."""

    def __init__(
        self, accelerator: accelerate.Accelerator, url: str, **manager_kwargs: Any
    ) -> None:
        if not isinstance(accelerator, accelerate.Accelerator):
            raise ConfigError(
                f"CkptkitAccelerate needs an accelerate.Accelerator, got {type(accelerator).__name__}"
            )
        self.accelerator = accelerator
        # The adapter runs its own collectives through accelerate (gather/broadcast, which
        # also work on accelerate's non-torch.distributed backends), and every process
        # reads on resume; the manager's own distributed mode would add a second set of
        # collectives that these processes never enter in the same order.
        manager_kwargs.setdefault("distributed", False)
        self.manager = CheckpointManager(url, **manager_kwargs)
        self._rng = _ProcessRNG(accelerator)
        self._counters = _AcceleratorCounters(accelerator)
        self._loaders: dict[int, _TrackedLoader] = {}
        # With several processes: the main process's stop decision, broadcast by maybe_save.
        self._stop = False
        self._stop_reason: str | None = None

    # -- context manager ------------------------------------------------------
    def __enter__(self) -> CkptkitAccelerate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Flush pending writes and release the run lock."""
        self.manager.close()

    # -- state ----------------------------------------------------------------
    def loader(self, dataloader: Any) -> _TrackedLoader:
        """The prepared ``dataloader`` with its position tracked: iterate this instead."""
        if isinstance(dataloader, _TrackedLoader):
            return dataloader
        if not any(d is dataloader for d in self.accelerator._dataloaders):
            raise ConfigError(
                "ck.loader() takes a DataLoader returned by accelerator.prepare(); prepare it first"
            )
        return self._tracked(dataloader)

    def _tracked(self, dataloader: Any) -> _TrackedLoader:
        tracked = self._loaders.get(id(dataloader))
        if tracked is None or tracked.dataloader is not dataloader:
            tracked = self._loaders[id(dataloader)] = _TrackedLoader(self.accelerator, dataloader)
        return tracked

    @property
    def state(self) -> dict[str, Any]:
        """The named state a checkpoint holds, built from what the accelerator prepared and
        registered now."""
        acc = self.accelerator
        # accelerate keeps what it prepared and registered in these lists (private, but
        # the very ones its own save_state/load_state walk, in the same order).
        state: dict[str, Any] = {}
        for i, model in enumerate(acc._models):
            state[state_name("model", i)] = acc.unwrap_model(model)
        for i, opt in enumerate(acc._optimizers):
            # The optimizer inside accelerate's wrapper: its class is what is recorded and
            # checked, so that a plain loop (or another wrapper) restores it too.
            state[state_name("optimizer", i)] = getattr(opt, "optimizer", opt)
        for i, sched in enumerate(acc._schedulers):
            state[state_name("scheduler", i)] = getattr(sched, "scheduler", sched)
        for i, obj in enumerate(acc._custom_objects):
            state[f"custom_checkpoint_{i}"] = obj
        if acc.scaler is not None:
            state["scaler"] = acc.scaler
        state["rng"] = self._rng
        for i, dl in enumerate(acc._dataloaders):
            state[state_name("dataloader", i)] = self._tracked(dl)
        state["accelerator"] = self._counters
        return state

    # -- saving ---------------------------------------------------------------
    @contextlib.contextmanager
    def _gathered(self, state: Mapping[str, Any]) -> Iterator[None]:
        """With several processes, every process's RNG and loader states gathered for the
        save (a collective); one process reads its own at save time."""
        parts = [self._rng, *(o for o in state.values() if isinstance(o, _TrackedLoader))]
        if self.accelerator.num_processes > 1:
            for part in parts:
                part.gather()
        try:
            yield
        finally:
            for part in parts:
                part.ranks = None  # never saved again: the next save gathers afresh

    def save(
        self, step: int, metrics: Mapping[str, float] | None = None, *, epoch: int | None = None
    ) -> CheckpointInfo | None:
        """Save now, on every process; returns the committed checkpoint on the main one
        (None on the others). Every process returns once it is committed."""
        state = self.state
        with self._gathered(state):
            info = self.manager.save(step, state, metrics, epoch=epoch)
        if self.accelerator.num_processes > 1:
            self.manager.wait()
            self.accelerator.wait_for_everyone()
        return info

    def maybe_save(
        self,
        step: int,
        metrics: Mapping[str, float] | None = None,
        *,
        epoch: int | None = None,
        epoch_end: bool = False,
    ) -> CheckpointInfo | None:
        """Save when the manager's policies say so (``CheckpointManager.maybe_save``)."""
        state = self.state
        if self.accelerator.num_processes == 1:
            return self.manager.maybe_save(step, state, metrics, epoch=epoch, epoch_end=epoch_end)
        info = None
        with self._gathered(state):  # a collective: every process takes part at every call
            if self.accelerator.is_main_process:
                info = self.manager.maybe_save(
                    step, state, metrics, epoch=epoch, epoch_end=epoch_end
                )
                self.manager.wait()
        # The main process's decision, so every process stops together: also the barrier
        # after which the checkpoint is committed for all.
        flags = [self.manager.should_stop, self.manager.stop_reason]
        broadcast_object_list(flags)
        self._stop = self._stop or bool(flags[0])
        self._stop_reason = self._stop_reason or flags[1]
        return info

    @property
    def should_stop(self) -> bool:
        """True once a signal or the time limit forced a save (on the main process, with
        several): leave the loop now, on every process."""
        return self._stop or self.manager.should_stop

    @property
    def stop_reason(self) -> str | None:
        """Why ``should_stop`` is true (a signal name, ``"time limit"``), else None."""
        return self._stop_reason or self.manager.stop_reason

    @property
    def exit_code(self) -> int:
        """0, or ``ckptkit.EXIT_RESUMABLE`` (75) when stopped early by a signal or time limit."""
        return EXIT_RESUMABLE if self.should_stop else 0

    # -- restoring ------------------------------------------------------------
    def resume(self, resume: str = "auto", **kwargs: Any) -> ResumeResult:
        """``CheckpointManager.resume`` into the accelerator's state, on every process."""
        state: MutableMapping[str, Any] = self.state
        return self.manager.resume(state, resume, **kwargs)
