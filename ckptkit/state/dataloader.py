"""A DataLoader that resumes mid-epoch at the exact next batch without re-reading data."""

from __future__ import annotations

import math
import random
import weakref
from collections.abc import Iterator, Mapping, Sized
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ckptkit.errors import ConfigError, IncompatibleCheckpointError

# Arguments this class decides itself; accepting them would silently break exact resume.
_OWNED_KWARGS = ("sampler", "batch_sampler", "generator")
# Must match between the saving and the resuming run, else "the next batch" means nothing.
_CHECKED_KEYS = ("dataset_len", "batch_size", "world_size", "shuffle", "drop_last")


class LoaderPosition(NamedTuple):
    """Where a ``ResumableDataLoader`` is: the epoch in progress (or about to start) and
    how many of its batches were handed to the loop (the index of the next batch)."""

    epoch: int
    batch: int


class ResumableDataLoader:
    """A map-style DataLoader whose position is part of its state.

    A drop-in for ``torch.utils.data.DataLoader(dataset, batch_size, shuffle, ...)``: the
    same defaults (``batch_size=1``, no shuffling unless ``shuffle=True``,
    ``num_workers=0``, ``drop_last=False``) and, without shuffling, the same batches.

    Recommended use::

        for epoch in range(start_epoch, epochs):
            loader.set_epoch(epoch)
            for batch in loader:
                ...

    What callers may rely on:

    * Order: epoch `e` visits `torch.randperm(len(dataset))` drawn from
      `torch.Generator().manual_seed(seed + e)` (or `range(len(dataset))` without shuffle),
      sharded over `world_size` exactly as `DistributedSampler(seed=seed, drop_last=drop_last)`
      does: padded by repeating indices, or trimmed when `drop_last`, so every rank has the
      same number of batches. The order does not depend on `num_workers` or on the global RNGs.
    * Position: `loader.position` is `(epoch, batch)`, the epoch in progress and the index
      of the next batch (`loader.epoch`, `loader.batch_index`); it is what a checkpoint
      saves. A batch counts as consumed when it is handed to the loop, not when a worker
      prefetches it. After `load_state_dict`, iteration yields the next batch the
      uninterrupted run would have yielded, and `dataset[i]` is never called for indices of
      the batches already consumed in that epoch. The state is the same on every rank, so
      any rank's copy restores all of them.
    * Epochs: `set_epoch(e)` with the epoch in progress keeps the position; any other epoch
      starts at its first batch. Exhausting an epoch moves to epoch + 1, batch 0, so plain
      repeated `for batch in loader` walks successive epochs too.
    * Global RNGs: creating or draining an iterator leaves the caller's `random`, `numpy`
      and `torch` global RNG states unchanged.
    * Augmentations (`per_batch_seed=True`, the default): just before batch `b` of epoch `e` is
      fetched, the fetching process seeds `random`, NumPy's global RNG and torch's CPU RNG from
      `(seed, e, rank, b)`. Random augmentations drawn from those RNGs inside `dataset[i]` are
      therefore identical after a resume and for any `num_workers`. Not covered: RNGs the
      dataset or a `worker_init_fn` keeps for itself (e.g. a `numpy.random.default_rng()`
      attribute; seed such a one from `torch.initial_seed()` and the index inside
      `dataset[i]` instead), CUDA RNG use inside `dataset[i]`, and draws in `collate_fn`
      when `num_workers=0` (those come from the training loop's RNGs). With `num_workers=0`
      the caller's RNG states are saved and put back around each fetch, about 0.1 ms per
      batch. With `per_batch_seed=False`, worker seeds are fixed per (seed, epoch), but which
      worker fetches which batch shifts on resume, so augmentations differ after a resume.
    * `len(loader)` is the number of batches per epoch on this rank.

    Extra keyword arguments (`collate_fn`, `pin_memory`, `persistent_workers`, `worker_init_fn`,
    `prefetch_factor`, ...) go to the inner `torch.utils.data.DataLoader`. Keep a single
    iterator alive at a time: starting a new one (or loading state, or changing epoch)
    detaches the old one from the position count.
    """

    # Under torch.distributed the manager saves each rank's state (and maps the position
    # when the world size changes: ``remap_state``).
    ckptkit_per_rank = True

    def __init__(
        self,
        dataset: Dataset[Any],
        batch_size: int = 1,
        shuffle: bool | None = None,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        *,
        per_batch_seed: bool = True,
        **dataloader_kwargs: Any,
    ) -> None:
        _validate(dataset, batch_size, seed, rank, world_size, dataloader_kwargs)
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.rank = rank
        self.world_size = world_size
        self.per_batch_seed = per_batch_seed
        self._dataset_len = len(dataset)  # type: ignore[arg-type]
        self._epoch = 0
        self._yielded = 0
        # Bumped whenever the position is reset, so an abandoned iterator stops counting.
        self._iteration = 0
        self._order_cache: tuple[tuple[int, int], torch.Tensor] | None = None
        # Our own generator: the inner DataLoader draws worker base seeds from it instead of
        # from the global torch RNG, which would make a resumed run's model RNG diverge.
        self._generator = torch.Generator()
        self._batch_sampler = _ResumeBatchSampler(self)
        # One inner DataLoader for the whole run, so persistent_workers keeps its workers.
        self._loader = DataLoader(
            _SeedingDataset(dataset) if per_batch_seed else dataset,
            batch_sampler=self._batch_sampler,
            num_workers=num_workers,
            generator=self._generator,
            **dataloader_kwargs,
        )

    @property
    def epoch(self) -> int:
        """The epoch in progress (or about to start)."""
        return self._epoch

    @property
    def batch_index(self) -> int:
        """Batches of the current epoch handed to the loop so far: the next batch's index."""
        return self._yielded

    @property
    def position(self) -> LoaderPosition:
        """``(epoch, batch)``: the epoch in progress and the index of its next batch."""
        return LoaderPosition(self._epoch, self._yielded)

    @property
    def num_workers(self) -> int:
        return self._loader.num_workers

    def __len__(self) -> int:
        samples = self._samples_per_rank()
        return (
            samples // self.batch_size if self.drop_last else math.ceil(samples / self.batch_size)
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; the position is kept only if it is the current one."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"set_epoch needs an int >= 0, got {epoch!r}")
        if epoch != self._epoch:
            self._epoch = int(epoch)
            self._yielded = 0
            self._iteration += 1

    def __iter__(self) -> Iterator[Any]:
        self._iteration += 1
        # Worker base seeds depend only on (seed, epoch), never on how many iterators came before.
        self._generator.manual_seed(_mix(self.seed, self._epoch))
        return self._count(iter(self._loader), self._iteration)

    def _count(self, batches: Iterator[Any], iteration: int) -> Iterator[Any]:
        for batch in batches:
            if iteration == self._iteration:
                self._yielded += 1
            yield batch
        if iteration == self._iteration:
            self._epoch += 1
            self._yielded = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "batches_yielded": self._yielded,
            "seed": self.seed,
            "dataset_len": self._dataset_len,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def check_state_dict(self, state: Any) -> None:
        """Raise IncompatibleCheckpointError unless `load_state_dict(state)` would take
        `state`; changes nothing (ckptkit checks every object before restoring any)."""
        current = self.state_dict()
        if not isinstance(state, Mapping) or (missing := sorted(set(current) - set(state))):
            lacks = f"lacks {missing}" if isinstance(state, Mapping) else "is not a dict"
            raise IncompatibleCheckpointError(
                f"loader state {lacks}; it was not written by ResumableDataLoader.state_dict()"
            )
        if state["shuffle"] is True and current["shuffle"] is False:
            # Runs saved before shuffle defaulted to False (as in DataLoader) shuffled
            # without asking: never continue them in another order.
            raise IncompatibleCheckpointError(
                "loader checkpoint was saved with shuffle=True but this loader does not "
                "shuffle (the default is shuffle=False, as in DataLoader); pass "
                "shuffle=True to ResumableDataLoader to resume the same data order"
            )
        for key in _CHECKED_KEYS:
            if state[key] != current[key]:
                raise IncompatibleCheckpointError(
                    f"loader checkpoint has {key}={state[key]!r} but this loader has "
                    f"{key}={current[key]!r}; resume with the same {key} to continue the epoch"
                )
        for key in ("epoch", "seed", "batches_yielded"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise IncompatibleCheckpointError(
                    f"loader checkpoint has {key}={value!r}, expected an int >= 0; the state "
                    "is corrupt or from another loader"
                )
        if not state["batches_yielded"] <= len(self):
            raise IncompatibleCheckpointError(
                f"loader checkpoint is at batch {state['batches_yielded']} of an epoch of "
                f"{len(self)} batches; the state is corrupt or from another loader"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved position; the saved seed replaces the constructor's. Raises
        IncompatibleCheckpointError if dataset length, batch size, world size, shuffle or
        drop_last differ from the saving run."""
        self.check_state_dict(state)
        self.seed = int(state["seed"])
        self._epoch = int(state["epoch"])
        self._yielded = int(state["batches_yielded"])
        self._iteration += 1

    def _samples_per_rank(self) -> int:
        if self.drop_last:
            return self._dataset_len // self.world_size
        return math.ceil(self._dataset_len / self.world_size)

    def _rank_order(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for `epoch`, as DistributedSampler would give them."""
        key = (self.seed, epoch)
        if self._order_cache is not None and self._order_cache[0] == key:
            return self._order_cache[1]
        n = self._dataset_len
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(n)
        total = self._samples_per_rank() * self.world_size
        if total > n:
            order = torch.cat([order, order.repeat(math.ceil((total - n) / n))[: total - n]])
        order = order[self.rank : total : self.world_size]
        self._order_cache = (key, order)
        return order


def remap_state(state: Any, loader: ResumableDataLoader) -> tuple[Any, str | None]:
    """``state`` saved at another world size, moved to ``loader``'s world size (and batch
    size) at the same number of samples consumed in the epoch; and a note saying so.
    Unchanged (no note) at the same world size, or when it is not a loader state
    (``check_state_dict`` then says why)."""
    keys = ("epoch", "batches_yielded", "world_size", "batch_size", "dataset_len", "drop_last")
    if not isinstance(state, Mapping) or not all(k in state for k in keys):
        return state, None
    old_world, old_batch, done = state["world_size"], state["batch_size"], state["batches_yielded"]
    numbers = (old_world, old_batch, done, state["dataset_len"])
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in numbers):
        return state, None
    if old_world == loader.world_size or old_world < 1 or old_batch < 1:
        return state, None
    n = state["dataset_len"]
    per_rank = n // old_world if state["drop_last"] else math.ceil(n / old_world)
    old_len = per_rank // old_batch if state["drop_last"] else math.ceil(per_rank / old_batch)
    step = loader.batch_size * loader.world_size
    if done >= old_len:  # the epoch was over: it is over here too
        consumed, batches, again = n, len(loader), 0
    else:
        # Every rank takes every world_size-th sample of one order (the same at any world
        # size), so b batches of every rank are the order's first b*batch*world samples.
        consumed = done * old_batch * old_world
        batches = min(consumed // step, len(loader))
        again = consumed - batches * step
    moved = {**state, "world_size": loader.world_size, "batch_size": loader.batch_size}
    moved["batches_yielded"] = batches
    note = (
        f"the loader was saved at world_size={old_world} and resumes at "
        f"world_size={loader.world_size}: epoch {state['epoch']} continues after the "
        f"{consumed} samples consumed (batch {batches})"
    )
    if again:
        note += f"; the last {again} of them are seen again"
    return moved, note


class _ResumeBatchSampler:
    """Batches of the loader's current epoch, starting after the last yielded batch.

    The inner DataLoader calls `iter()` on this once per epoch (also when it reuses
    persistent workers), so reading the loader's position at that moment is enough.
    """

    def __init__(self, loader: ResumableDataLoader) -> None:
        # A weak proxy: a strong one would put the inner DataLoader (and any persistent
        # workers) in a reference cycle, and shutting workers down from the cyclic garbage
        # collector stalls for seconds per worker.
        self._loader = weakref.proxy(loader)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[list[int]]:
        loader = self._loader
        return self._batches(loader._epoch, loader._yielded, loader._rank_order(loader._epoch))

    def _batches(self, epoch: int, start: int, order: torch.Tensor) -> Iterator[list[int]]:
        loader = self._loader
        size = loader.batch_size
        for index in range(start, len(loader)):
            batch = order[index * size : (index + 1) * size].tolist()
            if loader.per_batch_seed:
                batch = _SeededBatch(batch, _mix(loader.seed, epoch, loader.rank, index))
            yield batch


class _SeededBatch(list):
    """Sample indices plus the seed to set before fetching them (pickled to workers)."""

    def __init__(self, indices: list[int], seed: int) -> None:
        super().__init__(indices)
        self.seed = seed


class _SeedingDataset(Dataset):
    """Seeds the fetching process's global RNGs per batch, then defers to the user's dataset."""

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, batch: _SeededBatch) -> list[Any]:
        if get_worker_info() is not None:
            _seed_globals(batch.seed)
            return self._fetch(list(batch))
        # In the main process the globals belong to the training loop: put them back.
        saved = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
        try:
            _seed_globals(batch.seed)
            return self._fetch(list(batch))
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.default_generator.set_state(saved[2])

    def _fetch(self, indices: list[int]) -> list[Any]:
        getitems = getattr(self.dataset, "__getitems__", None)
        if getitems:
            return getitems(indices)
        return [self.dataset[i] for i in indices]

    def __getattr__(self, name: str) -> Any:
        # Lets worker_init_fn and collate code reach the user's dataset attributes through
        # get_worker_info().dataset. "dataset" itself is excluded so unpickling cannot recurse.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _seed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32])
    # Not torch.manual_seed: that would also reseed every CUDA device.
    torch.default_generator.manual_seed(seed)


def _mix(*values: int) -> int:
    """A well-spread 64-bit seed from small non-negative ints."""
    low, high = np.random.SeedSequence(values).generate_state(2, np.uint32)
    return int(low) | int(high) << 32


def _validate(
    dataset: Any, batch_size: int, seed: int, rank: int, world_size: int, kwargs: dict[str, Any]
) -> None:
    if isinstance(dataset, IterableDataset) or not isinstance(dataset, Sized):
        raise ConfigError(
            "ResumableDataLoader needs a map-style dataset with __len__ and __getitem__; "
            "wrap iterable data in a map-style Dataset"
        )
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("seed", seed, 0),
        ("world_size", world_size, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"ResumableDataLoader {name} must be an int >= {low}, got {value!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    owned = sorted(set(kwargs) & set(_OWNED_KWARGS))
    if owned:
        raise ConfigError(
            f"ResumableDataLoader chooses {', '.join(owned)} itself; drop the argument "
            "(use shuffle/seed/rank/world_size to control the order)"
        )
    if kwargs.get("in_order") is False:
        raise ConfigError("in_order=False reorders batches and breaks exact resume; drop it")
