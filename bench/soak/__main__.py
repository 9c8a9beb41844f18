"""``python -m bench.soak``: SIGKILL real training processes, resume, check; write the report.

    python -m bench.soak                          # 1,000 trials, docs/RELIABILITY.md
    python -m bench.soak --quick --out /tmp/r.md  # about 20 trials, the quick cases
    python -m bench.soak --trials 200 --seed 7 --storages local,drive --jobs 2
    python -m bench.soak --quick --async-save      # the killed workers save asynchronously

Exits 1 when any trial or case failed (the report says which), 0 otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

STORAGES = ("local", "drive", "gs")
REPO = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument(
        "--trials", type=int, default=None, help="kill trials (default 1000; 20 with --quick)"
    )
    p.add_argument("--seed", type=int, default=None, help="seed of the kill plan and the training")
    p.add_argument("--quick", action="store_true", help="about 20 trials and the fast cases")
    p.add_argument("--out", default=str(REPO / "docs" / "RELIABILITY.md"), help="the report")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--storages", default=",".join(STORAGES), help="comma-separated: local,drive,gs")
    p.add_argument("--jobs", type=int, default=2, help="chains run in parallel")
    p.add_argument("--chain", type=int, default=25, help="kills per run before it is finished")
    p.add_argument("--no-cases", dest="cases", action="store_false", help="kill trials only")
    p.add_argument(
        "--async-save",
        action="store_true",
        help="workers save with async_save=True (the uninterrupted reference saves sync)",
    )
    args = p.parse_args(argv)
    if args.trials is None:
        args.trials = 20 if args.quick else 1000
    if args.seed is None:
        args.seed = random.randrange(1 << 31)
    args.storages = [s.strip() for s in args.storages.split(",") if s.strip()]
    unknown = sorted(set(args.storages) - set(STORAGES))
    if unknown or args.trials < 1 or args.jobs < 1 or args.chain < 1:
        p.error(f"bad arguments (unknown storages {unknown}?); storages are {', '.join(STORAGES)}")
    return args


def share(trials: int, storages: list[str]) -> dict[str, int]:
    """Trials per storage: a tenth (at least 3) on gs:// (all of them when it is the only
    one), the rest split evenly."""
    out: dict[str, int] = {}
    rest = trials
    others = [s for s in storages if s != "gs"]
    if "gs" in storages:
        out["gs"] = min(trials, max(3, round(trials / 10))) if others else trials
        rest -= out["gs"]
    for i, storage in enumerate(others):
        out[storage] = rest // len(others) + (1 if i < rest % len(others) else 0)
    return {s: n for s, n in out.items() if n > 0}


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (and SIGINT, even where a shell started us ignoring it) unwinds like
    # Ctrl-C, so that the emulator is stopped and the temporary runs are removed.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    # Workers inherit these from the forkserver, which starts with the first trial.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    os.environ["CKPTKIT_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    from bench.soak import cases, report, trials
    from bench.soak.gcs import Emulator, emulator_installed

    started, t0 = time.time(), time.monotonic()
    commit = report.commit_of(REPO, Path(args.out))  # the code that runs, before any edit
    load = os.getloadavg()
    notes: list[str] = []
    storages = list(args.storages)
    if args.async_save:
        notes.append(
            "every killed worker saved with async_save=True (half of the chains with "
            "async_snapshot='rolling', which takes effect on local disks); the "
            "uninterrupted reference saved synchronously, and every finished run had to "
            "end bit-identical to it"
        )
    if "gs" in storages and not emulator_installed():
        storages.remove("gs")
        notes.append(
            "gs:// skipped: gcp-storage-emulator is not installed (pip install -e '.[dev]')"
        )
    root = Path(tempfile.mkdtemp(prefix="ckptkit-soak-"))
    emulator = None
    print(
        f"soak: {args.trials} trials on {', '.join(storages)}, seed {args.seed}, in {root}",
        flush=True,
    )
    try:
        if "gs" in storages:
            # Objects on disk, so that they survive the emulator being killed and restarted.
            emulator = Emulator(data_dir=str(root / "gcs-data")).start()
            os.environ["STORAGE_EMULATOR_HOST"] = emulator.host
        backends = {s: trials.make_backend(s, str(root), emulator) for s in storages}
        trials.prepare(gcs="gs" in storages)
        refs = _references(args, backends, notes, root)
        # A kill leaves damaged leftovers that readers skip with a warning, by design.
        from ckptkit import CheckpointWarning

        warnings.simplefilter("ignore", CheckpointWarning)
        chains_started = time.monotonic()
        results = _run_chains(args, backends, refs, emulator)
        chains_seconds = time.monotonic() - chains_started
        case_results = []
        if args.cases:
            print("soak: fault and hostile-input cases", flush=True)
            case_results = cases.run_cases(root, quick=args.quick)
    finally:
        if emulator is not None:
            emulator.stop()
        shutil.rmtree(root, ignore_errors=True)
    run = report.Run(
        trials_asked=args.trials,
        seed=args.seed,
        quick=args.quick,
        storages=storages,
        jobs=args.jobs,
        started=started,
        seconds=time.monotonic() - t0,
        trials=results,
        cases=case_results,
        notes=notes,
        load=load,
        trial_seconds=chains_seconds,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.soak " + " ".join(
        [
            f"--trials {args.trials}",
            f"--seed {args.seed}",
            f"--storages {','.join(args.storages)}",
            f"--jobs {args.jobs}",
        ]
        + (["--quick"] if args.quick else [])
        + (["--async-save"] if args.async_save else [])
    )
    out.write_text(report.markdown(run, commit, command))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(run), indent=1, default=str))
    kills = len(run.kills)
    print(
        f"soak: {kills} kills, {run.seconds:.0f} s; {'FAILED' if run.failed else 'ok'}; wrote {out}",
        flush=True,
    )
    return 1 if run.failed else 0


def _references(
    args: argparse.Namespace, backends: dict[str, Any], notes: list[str], root: Path
) -> dict[str, Any]:
    """The uninterrupted run every chain must end equal to: on local disk, and (except
    with --quick) on each other storage too, which must all agree bit for bit."""
    from bench.soak import trials

    ground = backends.get("local") or trials.make_backend("local", str(root))
    local = trials.reference(ground, args.seed, warm_up=True)
    refs = {}
    for storage, backend in backends.items():
        refs[storage] = (
            local if args.quick or storage == "local" else trials.reference(backend, args.seed)
        )
        if refs[storage].digest != local.digest:
            notes.append(f"the uninterrupted run on {storage} differs from the one on local disk")
    return refs


def _run_chains(
    args: argparse.Namespace, backends: dict[str, Any], refs: dict[str, Any], emulator: Any
) -> list[Any]:
    from bench.soak import trials

    master = random.Random(args.seed)
    ids = itertools.count()  # run names: each chain gets a fresh run
    tasks: list[dict[str, Any]] = []
    for storage, n in share(args.trials, list(backends)).items():
        emulator_left = max(1, n // 3) if storage == "gs" else 0
        for start in range(0, n, args.chain):
            size = min(args.chain, n - start)
            emu = min(emulator_left, max(1, size // 3)) if emulator_left else 0
            emulator_left -= emu
            tasks.append(
                {
                    "storage": storage,
                    "run": f"chain-{next(ids)}",
                    "trials": size,
                    "emulator": emu,
                    "seed": master.getrandbits(63),
                }
            )
    results: list[Any] = []
    lock, gcs_lock = threading.Lock(), threading.Lock()
    pending = list(tasks)
    done = [0]

    def work() -> None:
        while True:
            with lock:
                if not pending:
                    return
                task = pending.pop(0)
            rng = random.Random(task["seed"])
            storage = task["storage"]
            held = gcs_lock if storage == "gs" else None  # one at a time: emulator kills
            if held:
                held.acquire()
            try:
                out = trials.run_chain(
                    backends[storage],
                    task["run"],
                    task["trials"],
                    refs[storage],
                    trials.Planner(rng),
                    rng,
                    args.seed,
                    emulator=emulator,
                    emulator_trials=task["emulator"],
                    async_save=args.async_save,
                )
            finally:
                if held:
                    held.release()
            used = sum(1 for t in out if t.kind != "final")
            with lock:
                if used < task["trials"]:  # the run finished early: go on in a fresh one
                    emu = task["emulator"] - sum(1 for t in out if t.kind == "emulator")
                    pending.append(
                        {
                            **task,
                            "run": f"chain-{next(ids)}",
                            "trials": task["trials"] - used,
                            "emulator": max(0, emu),
                            "seed": rng.getrandbits(63),
                        }
                    )
                results.extend(out)
                done[0] += used
                bad = sum(1 for t in out if t.problems)
                print(
                    f"  {storage} {task['run']}: {used} trials, {bad} failed "
                    f"({done[0]}/{args.trials})",
                    flush=True,
                )

    # Daemons, joined in slices: Ctrl-C reaches the main thread, which stops the emulator
    # and exits; the forkserver and any worker holding at a kill point see the pipe close.
    threads = [threading.Thread(target=work, daemon=True) for _ in range(args.jobs)]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.5)
    return results


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("soak: interrupted; no report written", file=sys.stderr)
        sys.exit(130)
