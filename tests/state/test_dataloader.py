from __future__ import annotations

import io
import multiprocessing
import random
import time
import weakref

import numpy as np
import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    Dataset,
    DistributedSampler,
    IterableDataset,
    get_worker_info,
)

from ckptkit.errors import ConfigError, IncompatibleCheckpointError
from ckptkit.state import ResumableDataLoader

EPOCHS = 2


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


class RecordingDataset(Dataset):
    """Item i is (i, a draw from each global RNG), like a random augmentation would make.
    Fetch counts live in shared memory so that worker processes report them too."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._fetches = multiprocessing.RawArray("i", n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._fetches[index] += 1
        noise = random.random() + np.random.rand() + torch.rand((), dtype=torch.float64).item()
        return torch.tensor(index), torch.tensor(noise, dtype=torch.float64)

    def fetches(self) -> np.ndarray:
        return np.frombuffer(self._fetches, dtype=np.int32).copy()


class CallLog(Dataset):
    """A large dataset that only remembers which indices were fetched (main process only)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        self.calls.append(index)
        return index


Batch = tuple[list[int], list[float]]


def train(loader: ResumableDataLoader, epochs: int, limit: int | None = None) -> list[Batch]:
    """The recommended loop, from the loader's current epoch; stops after `limit` batches."""
    seen: list[Batch] = []
    for epoch in range(loader.epoch, epochs):
        loader.set_epoch(epoch)
        for index, noise in loader:
            seen.append((index.tolist(), noise.tolist()))
            if len(seen) == limit:
                return seen
    return seen


def make(dataset: Dataset, **kwargs: object) -> ResumableDataLoader:
    options: dict = {"batch_size": 4, "seed": 7, "shuffle": True} | kwargs
    return ResumableDataLoader(dataset, **options)


SETUPS = {
    "main-process": {},
    "2-workers": {"num_workers": 2},
    "2-persistent-workers": {"num_workers": 2, "persistent_workers": True},
}
# Stop mid-epoch 0, right after its last batch (still inside the loop), and mid-epoch 1.
RESUME_CASES = [("main-process", k) for k in (1, 6, 13, 16)]
RESUME_CASES += [("2-workers", k) for k in (6, 13, 16)] + [("2-persistent-workers", 6)]
RESUME_CASES += [("2-persistent-workers", 16)]


@pytest.mark.parametrize(
    ("setup", "stop_after"),
    [pytest.param(SETUPS[name], k, id=f"{name}-stop{k}") for name, k in RESUME_CASES],
)
def test_resume_continues_exactly_without_refetching(setup: dict, stop_after: int) -> None:
    """50 items in batches of 4 is 13 batches an epoch."""
    full = train(make(RecordingDataset(50), **setup), EPOCHS)
    assert len(full) == 2 * 13

    interrupted = make(RecordingDataset(50), **setup)
    head = train(interrupted, EPOCHS, limit=stop_after)
    state = roundtrip(interrupted.state_dict())

    dataset = RecordingDataset(50)
    resumed = make(dataset, **setup)
    resumed.load_state_dict(state)
    epoch = resumed.epoch
    rest_of_epoch = train(resumed, epoch + 1)
    fetched = dataset.fetches()
    rest = rest_of_epoch + train(resumed, EPOCHS)

    assert head + rest == full
    expected = np.zeros(50, dtype=np.int32)
    for indices, _ in rest_of_epoch:
        expected[indices] += 1
    np.testing.assert_array_equal(fetched, expected)


def test_resume_without_per_batch_seed_keeps_the_order() -> None:
    full = train(make(RecordingDataset(30), num_workers=2, per_batch_seed=False), EPOCHS)
    interrupted = make(RecordingDataset(30), num_workers=2, per_batch_seed=False)
    head = train(interrupted, EPOCHS, limit=4)
    resumed = make(RecordingDataset(30), num_workers=2, per_batch_seed=False)
    resumed.load_state_dict(roundtrip(interrupted.state_dict()))
    rest = train(resumed, EPOCHS)
    assert [b[0] for b in head + rest] == [b[0] for b in full]


def test_dropped_loader_is_freed_without_a_gc_pass() -> None:
    """A reference cycle would leave persistent workers to the cyclic GC, which stalls."""
    loader = make(RecordingDataset(12), num_workers=2, persistent_workers=True)
    list(loader)
    ref = weakref.ref(loader)
    del loader
    assert ref() is None


def test_order_and_augmentations_do_not_depend_on_workers() -> None:
    assert train(make(RecordingDataset(30)), EPOCHS) == train(
        make(RecordingDataset(30), num_workers=2), EPOCHS
    )


def test_prefetched_batches_are_not_consumed() -> None:
    dataset = RecordingDataset(40)
    loader = make(dataset, num_workers=2, prefetch_factor=3)
    iterator = iter(loader)
    first = next(iterator)
    deadline = time.monotonic() + 10
    while dataset.fetches().sum() < 3 * 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dataset.fetches().sum() >= 3 * 4, "workers should have prefetched further batches"
    state = roundtrip(loader.state_dict())
    assert state["batches_yielded"] == 1

    second = next(iterator)
    resumed = make(RecordingDataset(40))
    resumed.load_state_dict(state)
    assert not torch.equal(first[0], second[0])
    assert torch.equal(next(iter(resumed))[0], second[0])


def test_epoch_semantics() -> None:
    loader = make(RecordingDataset(20), num_workers=0)
    epoch0 = [b[0].tolist() for b in loader]
    assert loader.epoch == 1 and loader.state_dict()["batches_yielded"] == 0
    epoch1 = [b[0].tolist() for b in loader]
    assert epoch0 != epoch1 and sorted(sum(epoch0, [])) == list(range(20))

    loader.set_epoch(0)
    iterator = iter(loader)
    assert [next(iterator)[0].tolist() for _ in range(2)] == epoch0[:2]
    loader.set_epoch(0)  # the epoch in progress: keep the position
    assert [b[0].tolist() for b in loader] == epoch0[2:]
    loader.set_epoch(1)
    loader.set_epoch(1)
    assert [b[0].tolist() for b in loader] == epoch1
    assert loader.epoch == 2
    with pytest.raises(ConfigError, match="set_epoch needs an int >= 0"):
        loader.set_epoch(-1)


def test_abandoned_iterator_stops_counting() -> None:
    loader = make(RecordingDataset(20))
    stale = iter(loader)
    next(stale)
    loader.set_epoch(3)
    next(stale)
    assert loader.state_dict()["batches_yielded"] == 0


@pytest.mark.parametrize(
    ("setup", "per_batch_seed"),
    [({"num_workers": 0}, True), ({"num_workers": 2}, True), ({"num_workers": 2}, False)],
)
def test_iterating_leaves_global_rngs_alone(setup: dict, per_batch_seed: bool) -> None:
    def snapshot() -> tuple:
        return torch.get_rng_state().tolist(), np.random.get_state()[1].tolist(), random.getstate()

    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    before = snapshot()
    loader = make(RecordingDataset(20), per_batch_seed=per_batch_seed, **setup)
    iterator = iter(loader)
    next(iterator)
    assert snapshot() == before
    list(iterator)
    assert snapshot() == before


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [True, False])
def test_rank_sharding_matches_distributed_sampler(drop_last: bool, shuffle: bool) -> None:
    dataset, world_size = RecordingDataset(50), 3
    per_rank = []
    for rank in range(world_size):
        loader = make(
            dataset, shuffle=shuffle, drop_last=drop_last, rank=rank, world_size=world_size
        )
        sampler = DistributedSampler(
            dataset, world_size, rank, shuffle=shuffle, seed=7, drop_last=drop_last
        )
        batches = BatchSampler(sampler, 4, drop_last)
        for epoch in range(EPOCHS):
            loader.set_epoch(epoch)
            sampler.set_epoch(epoch)
            assert [b[0].tolist() for b in loader] == list(batches)
        per_rank.append(list(sampler))
        assert len(loader) == len(batches)

    assert len({len(indices) for indices in per_rank}) == 1
    flat = sorted(sum(per_rank, []))
    if drop_last:
        assert flat == sorted(set(flat))  # disjoint
    else:
        assert set(flat) == set(range(50))  # covering (padding repeats a few)


def test_rank_resume_and_shared_state() -> None:
    full = train(make(RecordingDataset(50), rank=2, world_size=3), EPOCHS)
    other_rank = make(RecordingDataset(50), rank=0, world_size=3)
    head = train(other_rank, EPOCHS, limit=3)
    resumed = make(RecordingDataset(50), rank=2, world_size=3)
    resumed.load_state_dict(roundtrip(other_rank.state_dict()))
    assert [b[0] for b in train(resumed, EPOCHS)] == [b[0] for b in full[len(head) :]]


@pytest.mark.parametrize("position", [10, 100_000])
def test_resume_at_large_position_fetches_only_the_next_batch(position: int) -> None:
    n, batch_size = 4_000_000, 32
    saved = ResumableDataLoader(CallLog(n), batch_size=batch_size, shuffle=True, seed=3)
    saved.set_epoch(1)
    state = roundtrip(saved.state_dict() | {"batches_yielded": position})

    dataset = CallLog(n)
    loader = ResumableDataLoader(dataset, batch_size=batch_size, shuffle=True, seed=3)
    loader.load_state_dict(state)
    batch = next(iter(loader))

    order = torch.randperm(n, generator=torch.Generator().manual_seed(3 + 1))
    expected = order[position * batch_size : (position + 1) * batch_size].tolist()
    assert batch.tolist() == expected
    assert dataset.calls == expected
    assert loader.state_dict()["batches_yielded"] == position + 1


def test_resume_after_real_iteration_on_large_dataset() -> None:
    n = 3_200_000
    first = ResumableDataLoader(CallLog(n), batch_size=32)
    iterator = iter(first)
    for _ in range(10):
        next(iterator)
    eleventh = next(iterator)

    dataset = CallLog(n)
    resumed = ResumableDataLoader(dataset, batch_size=32)
    resumed.load_state_dict(roundtrip(first.state_dict() | {"batches_yielded": 10}))
    assert torch.equal(next(iter(resumed)), eleventh)
    assert len(dataset.calls) == 32


def test_state_is_plain() -> None:
    state = make(RecordingDataset(10)).state_dict()
    assert state == roundtrip(state)
    assert all(type(v) in (int, bool) for v in state.values())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"n": 51}, "dataset_len=50"),
        ({"batch_size": 5}, "batch_size=4"),
        ({"world_size": 2}, "world_size=1"),
        ({"shuffle": False}, "shuffle=True"),
    ],
)
def test_mismatched_state_raises(change: dict, match: str) -> None:
    state = make(RecordingDataset(50)).state_dict()
    n = change.pop("n", 50)
    with pytest.raises(IncompatibleCheckpointError, match=match):
        make(RecordingDataset(n), **change).load_state_dict(state)


def test_position_past_epoch_end_raises() -> None:
    loader = make(RecordingDataset(10))
    with pytest.raises(IncompatibleCheckpointError, match="batch 4 of an epoch of 3"):
        loader.load_state_dict(loader.state_dict() | {"batches_yielded": 4})


def test_saved_seed_wins() -> None:
    full = train(make(RecordingDataset(20), seed=1), 1)
    saved = make(RecordingDataset(20), seed=1)
    head = train(saved, 1, limit=2)
    resumed = make(RecordingDataset(20), seed=2)
    resumed.load_state_dict(saved.state_dict())
    assert head + train(resumed, 1) == full


class Stream(IterableDataset):
    def __iter__(self):
        yield from range(3)


@pytest.mark.parametrize(
    ("dataset", "kwargs", "match"),
    [
        (Stream(), {}, "map-style dataset"),
        (list(range(4)), {"batch_size": 0}, "batch_size must be an int >= 1"),
        (list(range(4)), {"seed": -1}, "seed must be an int >= 0"),
        (list(range(4)), {"rank": 2, "world_size": 2}, "rank must be an int in"),
        (list(range(4)), {"sampler": [0, 1]}, "chooses sampler itself"),
        (list(range(4)), {"generator": torch.Generator()}, "chooses generator itself"),
        (list(range(4)), {"in_order": False}, "in_order=False"),
    ],
)
def test_bad_arguments(dataset: object, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ResumableDataLoader(dataset, **kwargs)  # type: ignore[arg-type]


def check_worker_sees_user_dataset(worker_id: int) -> None:
    assert get_worker_info().dataset.n == 12  # type: ignore[union-attr]


def test_dataloader_kwargs_pass_through() -> None:
    loader = make(
        RecordingDataset(12),
        num_workers=2,
        collate_fn=lambda items: [index for index, _ in items],
        worker_init_fn=check_worker_sees_user_dataset,
    )
    batches = list(loader)
    assert all(isinstance(batch, list) for batch in batches)
    assert sorted(int(i) for batch in batches for i in batch) == list(range(12))
    assert len(loader) == 3 and loader.num_workers == 2
