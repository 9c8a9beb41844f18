"""What ckptkit costs a training loop between saves, and during one.

1. ``maybe_save`` when no policy fires (every step of a run but the saving ones), with
   the usual triggers (every N steps, every T minutes, SIGTERM/SIGUSR1 handling), timed
   over many calls, against one bare training step of a GPT-2-shaped model + AdamW; an
   A/B of blocks of steps with and without it is shown too (noisier: the difference of
   two large numbers).
2. The loop's throughput over a save interval: a block of steps with one save at its
   start (sync, and async where this build has it) against the same block without a
   save. An async save that returns at once but slows the next steps (copy-on-write
   faults, a writer competing for the CPU) shows here, not in ``save()``'s own time.
"""

from __future__ import annotations

import itertools
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any

from bench import _state, _writers
from bench._harness import NA, Samples, Target, interleaved, mb, table

BARE = "bare training step"
WITH = "training step + idle maybe_save"
NO_SAVE = "no save"
SYNC = "one sync save at the start"
ASYNC = "one async save at the start"


@dataclass
class OverheadResult:
    step_state_bytes: int
    call: Samples
    calls_per_sample: int
    steps: dict[str, Samples]
    interval_state_bytes: int
    interval_steps: int
    interval: dict[str, Samples | None] = field(default_factory=dict)
    reps: int = 0
    interval_reps: int = 0


def _idle_manager(url: str) -> Any:
    return _writers.manager(
        url, save_every_steps=10**9, save_every_minutes=10**6, handle_signals=True
    )


def measure(
    step_mb: float,
    interval_mb: float,
    interval_steps: int,
    reps: int,
    calls: int,
    *,
    step_reps: int,
    warmup: bool = True,
) -> OverheadResult:
    warnings.simplefilter("ignore")
    model, opt = _state.build(step_mb)
    state = _writers.ckptkit_state(model, opt)
    with tempfile.TemporaryDirectory(prefix="ckptkit-bench-overhead-") as root:
        with _idle_manager(f"{root}/run") as mgr:
            counter = itertools.count(1)

            def calls_only() -> None:
                for _ in range(calls):
                    mgr.maybe_save(next(counter), state)

            def bare() -> None:
                _state.train_step(model, opt)

            def with_maybe_save() -> None:
                _state.train_step(model, opt)
                mgr.maybe_save(next(counter), state)

            call = interleaved({"call": calls_only}, reps, warmup=warmup)["call"]
            call = call.scaled(1 / calls)
            steps = interleaved({BARE: bare, WITH: with_maybe_save}, step_reps, warmup=warmup)
        # Each repetition is a whole interval of steps of the smallest benchmarked state:
        # three keep the section to a minute or two and still show a spread.
        interval = _interval(interval_mb, interval_steps, min(reps, 3), root, warmup)
    return OverheadResult(
        _state.nbytes(model, opt),
        call,
        calls,
        dict(steps),
        interval[0],
        interval_steps,
        interval[1],
        reps,
        min(reps, 3),
    )


def _interval(
    megabytes: float, steps: int, reps: int, root: str, warmup: bool
) -> tuple[int, dict[str, Samples | None]]:
    model, opt = _state.build(megabytes)
    state = _writers.ckptkit_state(model, opt)
    counter = itertools.count(1)
    managers = {SYNC: _writers.manager(f"{root}/sync")}
    if _writers.has_async_save():
        managers[ASYNC] = _writers.manager(f"{root}/async", async_save=True)

    def block(mgr: Any) -> None:
        if mgr is not None:
            mgr.save(next(counter), state)
        for _ in range(steps):
            _state.train_step(model, opt)
        if mgr is not None:
            mgr.wait()  # what is still in flight belongs to this interval

    try:
        cases = {NO_SAVE: lambda: block(None)}
        cases.update({name: (lambda m=m: block(m)) for name, m in managers.items()})
        out: dict[str, Samples | None] = dict(interleaved(cases, reps, warmup=warmup))
    finally:
        for m in managers.values():
            m.close()
    out.setdefault(ASYNC, None)
    return _state.nbytes(model, opt), out


def tables(r: OverheadResult) -> tuple[list[str], list[Target]]:
    bare, with_ = r.steps[BARE], r.steps[WITH]
    share = r.call.median / bare.median
    ab = (with_.median - bare.median) / bare.median
    rows = [
        [
            f"idle maybe_save, one call ({r.reps} × {r.calls_per_sample:,} calls)",
            r.call.show("µs", 1e6, 1),
            f"{share * 100:.2g} % of a step",
        ],
        [BARE, bare.show("ms", 1e3, 1), ""],
        [WITH, with_.show("ms", 1e3, 1), f"{ab:+.2%} (A/B, noisy)"],
    ]
    step_block = table(["per step", "time: median (min–max)", "overhead"], rows, "lrr")
    none = r.interval[NO_SAVE]
    assert none is not None
    irows = []
    for name, s in r.interval.items():
        if s is None:
            irows.append([name, NA, ""])
            continue
        per_step = s.median / r.interval_steps
        irows.append(
            [name, s.show(), f"{r.interval_steps / s.median:.2f} steps/s ({per_step * 1e3:.0f} ms)"]
        )
    interval_block = table(
        [
            f"{r.interval_steps} steps ({mb(r.interval_state_bytes)} state)",
            "time: median (min–max)",
            "throughput",
        ],
        irows,
        "lrr",
    )
    note = (
        f"Training step: forward, backward and AdamW on a {mb(r.step_state_bytes)} GPT-2-shaped "
        "state (batch 2 × 16 tokens, a small step, so the share is an upper bound); the manager "
        "has save_every_steps, save_every_minutes and handle_signals set, none firing."
    )
    inote = (
        f"Loop throughput over a save interval ({r.interval_reps} interleaved repetitions): "
        "a save, the steps, then wait(), so all of an async save's cost is inside; against "
        "the same steps without a save."
    )
    target = Target(
        "idle maybe_save < 1 % of a training step", f"{share * 100:.2g} %", share < 0.01
    )
    return ["## Per step", note, step_block, "## Over a save interval", inote, interval_block], [
        target
    ]
