"""``latest()`` on a run of 10 checkpoints and on one of 1,000, local and on ``gs://``
(the emulator): a resume must not get slower as a run grows.

The big run is made quickly: ckptkit saves its tiny checkpoints into several small runs
(a save lists its run, so one run of 1,000 saves would cost a million manifest reads on
a build that rereads them), whose committed checkpoints are then moved into one run; a
run is a folder of self-contained checkpoint folders (docs/FORMAT.md). The ``gs://``
runs are those local runs uploaded object by object, as a ``gs://`` save lays them out.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench import _gcs
from bench._harness import Samples, Target, fmt_ratio, interleaved, ratio, table

PART = 50  # checkpoints per small run


def _tiny_state() -> dict[str, Any]:
    torch.manual_seed(0)
    return {"model": torch.nn.Linear(4, 4)}


def make_run(path: Path, count: int) -> Path:
    """A local run of ``count`` committed checkpoints at steps 1..count."""
    from ckptkit import CheckpointManager

    path.mkdir(parents=True, exist_ok=True)
    state = _tiny_state()
    parts = max(1, -(-count // PART))
    for part in range(parts):
        url = str(path) if part == 0 else str(path.parent / f"{path.name}.part{part}")
        with CheckpointManager(url, keep_last=None, keep_best=0, run_name="bench") as mgr:
            for step in range(part + 1, count + 1, parts):
                mgr.save(step, state)
            infos = mgr.list()
        if part:
            for info in infos:
                os.rename(os.path.join(url, info.name), path / info.name)
            shutil.rmtree(url)
    return path


@dataclass
class LatestResult:
    counts: tuple[int, int]
    reps: int
    samples: dict[str, Samples | None] = field(default_factory=dict)
    found: dict[str, int | None] = field(default_factory=dict)
    manifests: dict[str, int] = field(default_factory=dict)  # read by one latest()
    gs_missing: str | None = None


def _counting_manifest_reads() -> tuple[dict[str, int], Callable[[], None]]:
    """Count the manifests ``latest()`` reads (every read goes through
    ``run._manifest_of``): the figure the target is about. Returns the counter and the
    undo."""
    from ckptkit import run as runmod

    counter = {"n": 0}
    original = runmod._manifest_of

    def counted(storage: Any, name: str) -> Any:
        counter["n"] += 1
        return original(storage, name)

    runmod._manifest_of = counted

    def undo() -> None:
        runmod._manifest_of = original

    return counter, undo


def _key(where: str, count: int) -> str:
    return f"{where}, {count:,} checkpoints"


def measure(
    root: Path,
    counts: tuple[int, int],
    reps: int,
    server: _gcs.Server | None,
    gs_missing: str | None,
    *,
    warmup: bool = True,
) -> LatestResult:
    from ckptkit import CheckpointManager

    warnings.simplefilter("ignore")
    result = LatestResult(counts, reps, gs_missing=gs_missing)
    urls: dict[str, str] = {}
    for count in counts:
        local = make_run(root / f"run-{count}", count)
        urls[_key("local", count)] = str(local)
        if server is not None:
            bucket = server.bucket()
            server.fs().put(str(local), f"{bucket}/run-{count}", recursive=True)
            urls[_key("gs://", count)] = f"gs://{bucket}/run-{count}"
    managers = {k: CheckpointManager(u, readonly=True) for k, u in urls.items()}
    try:
        cases: dict[str, Callable[[], object]] = {}
        for key, mgr in managers.items():

            def latest(mgr: Any = mgr, key: str = key) -> None:
                info = mgr.latest()
                result.found[key] = None if info is None else info.step

            cases[key] = latest
        result.samples = dict(interleaved(cases, reps, warmup=warmup))
        counter, undo = _counting_manifest_reads()
        try:
            for key, mgr in managers.items():  # one more call each, counted (untimed)
                counter["n"] = 0
                mgr.latest()
                result.manifests[key] = counter["n"]
        finally:
            undo()
    finally:
        for mgr in managers.values():
            mgr.close()
    if server is None:
        for count in counts:
            result.samples[_key("gs://", count)] = None
    return result


def tables(r: LatestResult) -> tuple[list[str], list[Target]]:
    small, big = r.counts
    rows, targets = [], []
    for where in ("local", "gs://"):
        a, b = r.samples.get(_key(where, small)), r.samples.get(_key(where, big))
        if a is None or b is None:
            rows.append([where, r.gs_missing or "n/a", "", "", "", ""])
            continue
        found = [r.found.get(_key(where, n)) for n in (small, big)]
        reads = [r.manifests.get(_key(where, n)) for n in (small, big)]
        growth = ratio(b.median, a.median)
        rows.append(
            [
                where,
                a.show("ms", 1e3, 1),
                b.show("ms", 1e3, 1),
                fmt_ratio(growth),
                f"{reads[0]} / {reads[1]}",
                "yes" if found == [small, big] else f"**NO** (steps {found})",
            ]
        )
        constant = reads[0] is not None and reads[0] == reads[1]
        targets.append(
            Target(
                f"{where}: latest() reads as many manifests at {big:,} checkpoints as at "
                f"{small:,} (a constant number, whatever the run's size)",
                f"{reads[0]} and {reads[1]}",
                constant and found == [small, big],
            )
        )
    block = table(
        [
            "storage",
            f"latest() at {small:,}: median (min–max)",
            f"at {big:,}",
            "growth",
            f"manifests read at {small:,} / {big:,}",
            "found the newest step",
        ],
        rows,
        "lrrrrl",
    )
    note = (
        f"{r.reps} interleaved repetitions of `CheckpointManager(url, readonly=True).latest()` "
        "(its default check: the newest checkpoint's files are read and verified) on runs of "
        "tiny checkpoints (one 4×4 Linear), then one more call each counting the manifests it "
        "reads. The time still grows a little with the run: listing the names is linear (on "
        "gs://, one request per 1,000 names; locally, a directory read of 1,000 entries), "
        "which the target does not count; what must not grow is the manifests read."
    )
    return [note, block], targets
