"""Checkpoint benchmarks, every figure side by side in one run, targets marked PASS/FAIL.

Each section writes a markdown table under bench/results/ (or --out), plus summary.md.

    python -m bench                               # 100 MB, 500 MB and 1 GB, 5 repetitions
    python -m bench --sizes 100,500 --reps 5
    python -m bench --only save,restore --sizes 100
    python -m bench --quick --out /tmp/b          # tiny state, 1 repetition: does it all run?

Sections (``--only``): save, restore, memory, latest, gs, overhead (all by default).
The separate ``bench/bench_<name>.py`` benchmarks run by name (``--only timellm_step``),
each writing its own table; the reliability soak is ``python -m bench.soak`` (it writes
docs/RELIABILITY.md). See bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from bench import _gcs
from bench._harness import RESULTS, Machine, Target, table, targets_in, targets_table, write

SECTIONS = ("save", "restore", "memory", "latest", "gs", "overhead")
# The separate benchmarks: every bench_<name>.py module, run by name with --only <name>.
OTHERS = tuple(
    sorted(
        m.name.removeprefix("bench_")
        for m in pkgutil.iter_modules([str(Path(__file__).parent)])
        if m.name.startswith("bench_")
    )
)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("--sizes", default="100,500,1000", help="state sizes in MB")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny state, 1 repetition, fewer checkpoints: checks that everything runs "
        "(tables go to a temp dir unless --out)",
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated, from {', '.join(SECTIONS + OTHERS)} (default: {', '.join(SECTIONS)})",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="where the tables go (default: bench/results/)"
    )
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args(argv)
    args.only = _csv(args.only)
    unknown = [s for s in args.only if s not in SECTIONS + OTHERS]
    if unknown:
        parser.error(
            f"unknown section {', '.join(unknown)}: pick from {', '.join(SECTIONS + OTHERS)}"
        )
    try:
        args.sizes = [float(s) for s in _csv(args.sizes)]
    except ValueError:
        parser.error(f"--sizes takes MB numbers separated by commas, got {args.sizes!r}")
    if args.reps < 1 or not args.sizes or min(args.sizes) <= 0:
        parser.error("--reps and every --sizes value must be positive")
    if args.quick:
        args.sizes, args.reps = [2.0], 1
    if args.out is None:
        # A quick run's numbers are noise: never over the committed tables.
        args.out = Path(tempfile.gettempdir()) / "ckptkit-bench-quick" if args.quick else RESULTS
    return args


class Run:
    """One benchmark run: its options, its machine line, the targets of every table."""

    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        self.args = args
        self.machine = Machine.now(argv)
        # A quick run checks that every row works, not how fast: no warm-up round.
        self.warmup = not args.quick
        self.scratch = Path(tempfile.mkdtemp(prefix="ckptkit-bench-", dir=args.dir))

    def section(self, name: str, title: str, blocks: list[str], targets: list[Target]) -> None:
        body = ["## Targets", targets_table(targets), *blocks] if targets else blocks
        path = write(self.args.out, name, title, self.machine, body)
        print(f"wrote {path}", flush=True)

    def timed(self, name: str, fn: Callable[[], None]) -> None:
        started = time.perf_counter()
        print(f"== {name}", flush=True)
        fn()
        print(f"== {name}: {time.perf_counter() - started:.0f} s", flush=True)


def _save_restore(run: Run) -> None:
    from bench import save_restore

    a = run.args
    save, restore = "save" in a.only, "restore" in a.only
    results = []
    for size in a.sizes:
        print(f"   {size:g} MB", flush=True)
        results.append(
            save_restore.measure(
                size,
                a.reps,
                run.scratch / f"sr-{size:g}",
                save=save,
                restore=restore,
                warmup=run.warmup,
            )
        )
    if save:
        blocks, targets = save_restore.save_tables(results)
        run.section(
            "save", "Save: ckptkit against the disk, torch.save, safetensors, DCP", blocks, targets
        )
    if restore:
        blocks, targets = save_restore.restore_tables(results)
        run.section(
            "restore", "Restore: ckptkit against torch.load and safetensors", blocks, targets
        )


def _memory(run: Run) -> None:
    from bench import memory

    # Quick: every probe in one process (fast, still each after a peak reset).
    results = {size: memory.measure(size, together=run.args.quick) for size in run.args.sizes}
    blocks, targets = memory.tables(results)
    note = (
        "One save of each kind per size, each in a fresh process, after a warm-up save of a "
        "tiny state the same way (imports are not counted; buffers a save allocates are): "
        "the growth of the process's peak RSS, plus the largest PSS of the processes it "
        "forks, sampled while the save runs; an async save is measured until committed. "
        "One measurement per cell: memory does not vary like time."
        " The thread writer streams what optimizers own straight from the live tensors and"
        " copies only what the loop's next optimizer step would change before it is written"
        ' (docs/RESUME.md, "Async save"): with no step during the save, nothing. The'
        " step-right-after row is the worst case (the step changes every owned tensor"
        " before the writer wrote any), shown without a target: a step that changes all of"
        " the state during a save costs a copy of it on either path (a copy of what is not"
        " written, or copy-on-write faults, which PSS also charges with half of the pages"
        " the child still shares), beside what that step needs alone (the row above it)."
        " `async_snapshot='rolling'` changes only the thread"
        " writer: where the fork writer is chosen (503 MB and 1 GB here, a state most of its"
        " process) every async row forks, and a step during the save copies on write each"
        " page it changes."
    )
    run.section("memory", "Peak extra memory during a save", [note, *blocks], targets)


def _remote(run: Run) -> None:
    from bench import gs, latest

    a = run.args
    counts = (10, 40) if a.quick else (10, 1000)
    missing = _gcs.missing()
    with _gcs.server() if missing is None else _no_server() as server:
        if "latest" in a.only:
            r = latest.measure(
                run.scratch / "latest", counts, a.reps, server, missing, warmup=run.warmup
            )
            blocks, targets = latest.tables(r)
            run.section("latest", "latest() as a run grows", blocks, targets)
        if "gs" in a.only:
            size = 2.0 if a.quick else 100.0
            result = None if server is None else gs.measure(size, a.reps, server, warmup=run.warmup)
            blocks, targets = gs.tables(result, missing)
            run.section("gs", "gs:// upload: ckptkit save against gcsfs pipe", blocks, targets)


class _no_server:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _overhead(run: Run) -> None:
    from bench import overhead

    a = run.args
    r = overhead.measure(
        step_mb=a.sizes[0] if a.quick else 20.0,
        interval_mb=min(a.sizes),
        interval_steps=3 if a.quick else 10,
        reps=a.reps,
        calls=100 if a.quick else 10_000,
        step_reps=3 if a.quick else 20,
        warmup=run.warmup,
    )
    blocks, targets = overhead.tables(r)
    run.section(
        "overhead", "What a loop pays for ckptkit between and during saves", blocks, targets
    )


def _summary(run: Run) -> None:
    """summary.md: the targets of every section table in the output folder (those of
    this run and, with ``--only``, those an earlier run left), each with its table."""
    rows, verdicts = [], []
    for name in SECTIONS:
        path = run.args.out / f"{name}.md"
        if not path.exists():
            continue
        for target, measured, verdict in targets_in(path.read_text()):
            rows.append((f"[{name}]({name}.md)", target, measured, verdict))
            verdicts.append(verdict.strip("*"))
    if not rows:
        return
    counts = ", ".join(f"{verdicts.count(v)} {v}" for v in ("PASS", "FAIL", "n/a"))
    note = "Collected from the tables in this folder; each names the run that measured it."
    body = [note, table(["table", "target", "measured", "verdict"], rows)]
    path = write(run.args.out, "summary", f"Targets: {counts}", run.machine, body)
    print(f"wrote {path}", flush=True)


def _other(name: str) -> None:
    module = importlib.import_module(f"bench.bench_{name}")
    saved = sys.argv
    sys.argv = [f"bench.bench_{name}"]  # they parse sys.argv: give them their defaults
    try:
        module.main()
    finally:
        sys.argv = saved


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    warnings.simplefilter("ignore")
    run = Run(args, argv)
    started = time.perf_counter()
    try:
        if {"save", "restore"} & set(args.only):
            run.timed("save, restore", lambda: _save_restore(run))
        if "memory" in args.only:
            run.timed("memory", lambda: _memory(run))
        if {"latest", "gs"} & set(args.only):
            run.timed("latest, gs", lambda: _remote(run))
        if "overhead" in args.only:
            run.timed("overhead", lambda: _overhead(run))
        _summary(run)
        for name in OTHERS:
            if name in args.only:
                run.timed(name, lambda name=name: _other(name))
    finally:
        import shutil

        shutil.rmtree(run.scratch, ignore_errors=True)
    print(f"done in {time.perf_counter() - started:.0f} s; tables in {args.out}", flush=True)


if __name__ == "__main__":
    main()
