"""Time from restoring a data loader's position to its first batch.

ResumableDataLoader jumps to the saved batch; the naive resume replays the epoch through a
plain DataLoader and throws the batches away. Run with `python -m bench.bench_resume_position`;
writes bench/results/resume_position.md.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from ckptkit.state import ResumableDataLoader

DATASET_LEN = 4_000_000
BATCH_SIZE = 32
SEED = 0
RESULTS = Path(__file__).resolve().parent / "results" / "resume_position.md"


class CountingDataset(Dataset):
    """Cheap items (a tensor per index), so the naive numbers are a best case: a dataset that
    reads or decodes anything pays that cost for every skipped item too."""

    def __init__(self, n: int) -> None:
        self.n = n
        # Shared memory, so that fetches in worker processes are counted too.
        self._fetched = multiprocessing.RawValue("q", 0)

    @property
    def fetched(self) -> int:
        return self._fetched.value

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        self._fetched.value += 1
        return torch.tensor(index)


def resumable_first_batch(position: int, num_workers: int) -> tuple[float, int]:
    """Seconds from load_state_dict to the first batch, and items fetched by then."""
    template = ResumableDataLoader(
        CountingDataset(DATASET_LEN), BATCH_SIZE, shuffle=True, seed=SEED
    )
    state = template.state_dict() | {"batches_yielded": position}
    dataset = CountingDataset(DATASET_LEN)
    loader = ResumableDataLoader(
        dataset, BATCH_SIZE, shuffle=True, seed=SEED, num_workers=num_workers
    )
    start = time.perf_counter()
    loader.load_state_dict(state)
    next(iter(loader))
    return time.perf_counter() - start, dataset.fetched


def naive_first_batch(position: int, num_workers: int) -> tuple[float, int]:
    """Seconds to replay `position` batches through a plain DataLoader and take the next."""
    dataset = CountingDataset(DATASET_LEN)
    loader = DataLoader(
        dataset,
        BATCH_SIZE,
        shuffle=True,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(SEED),
    )
    start = time.perf_counter()
    next(itertools.islice(loader, position, None))
    return time.perf_counter() - start, dataset.fetched


def measure(fn: Callable[[int, int], tuple[float, int]], position: int, workers: int, repeats: int):
    runs = [fn(position, workers) for _ in range(repeats)]
    return statistics.median(t for t, _ in runs), runs[0][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; the median is shown")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    plan = [
        ("ResumableDataLoader", resumable_first_batch, 10, 0),
        ("ResumableDataLoader", resumable_first_batch, 100_000, 0),
        ("ResumableDataLoader", resumable_first_batch, 10, 2),
        ("ResumableDataLoader", resumable_first_batch, 100_000, 2),
        ("naive skip (DataLoader)", naive_first_batch, 10, 0),
        ("naive skip (DataLoader)", naive_first_batch, 10_000, 0),
    ]
    rows = []
    for name, fn, position, workers in plan:
        seconds, fetched = measure(fn, position, workers, args.repeats)
        rows.append((name, workers, position, seconds, fetched))
        print(f"{name:24} workers={workers} position={position:>7,}: {seconds * 1e3:9.1f} ms")

    naive_per_batch = rows[-1][3] / 10_000
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report(rows, naive_per_batch, args.repeats))
    print(f"wrote {args.output}")


def report(rows: list, naive_per_batch: float, repeats: int) -> str:
    lines = [
        "# Resume position: time from `load_state_dict` to the first batch",
        "",
        f"Dataset of {DATASET_LEN:,} items, batch size {BATCH_SIZE}, shuffled; one item is a "
        "0-d tensor, so the naive rows are a best case. Median of "
        f"{repeats} runs. torch {torch.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}.",
        "",
        "| approach | workers | resume at batch | time to first batch | items fetched by then |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, workers, position, seconds, fetched in rows:
        lines.append(
            f"| {name} | {workers} | {position:,} | {seconds * 1e3:,.1f} ms | {fetched:,} |"
        )
    lines.append(
        f"| naive skip (DataLoader), extrapolated | 0 | 100,000 | "
        f"~{naive_per_batch * 100_000:,.1f} s | {100_001 * BATCH_SIZE:,} |"
    )
    lines += [
        "",
        "ResumableDataLoader's cost is mostly building the epoch's permutation "
        f"(`torch.randperm({DATASET_LEN:,})`), whatever the position; with workers, the items "
        "fetched include batches the workers prefetched after the first one (not counted as "
        "consumed). The naive replay grows linearly with the position and fetches every skipped item.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
