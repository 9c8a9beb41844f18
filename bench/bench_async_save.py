"""Async save on CPU: how long ``save()`` blocks, how long until the commit, and what a
training loop's throughput over save intervals is with sync, async and no saves.

    python -m bench.bench_async_save                 # ~500 MB of model + AdamW state
    python -m bench.bench_async_save --mb 100 --reps 5
    python -m bench.bench_async_save --quick         # tiny, correctness only (the suite)

The loop's step is a real AdamW step over every parameter, so it writes all of the state's
memory: with the fork writer each step during a write pays the copy-on-write faults of
the pages it touches, a cost a blocked-time figure alone would hide. Prints a markdown
table (medians, with min-max over the repetitions) and, with ``--json``, the raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

from ckptkit import CheckpointManager

WIDTH = 768


def build(mb: float) -> dict[str, Any]:
    """Square linear layers (weights and biases: hundreds of tensors at 500 MB) and AdamW
    after one step, so the moments exist: the state is about 3x the parameters."""
    per_layer = (WIDTH * WIDTH + WIDTH) * 4 * 3
    layers = max(1, round(mb * 1e6 / per_layer))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    state = {"model": model, "optimizer": opt}
    step(state)
    return state


def state_bytes(state: dict[str, Any]) -> int:
    model, opt = state["model"], state["optimizer"]
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for s in opt.state.values():
        n += sum(t.numel() * t.element_size() for t in s.values() if torch.is_tensor(t))
    return n


def step(state: dict[str, Any], batch: int = 0) -> None:
    """One optimizer step touching every parameter and moment. ``batch`` 0: gradients set
    directly (the loop is all optimizer steps: a save's worst case, each one comes right
    after the save before it); otherwise a real forward and backward of ``batch`` rows
    first, the time an async writer has before the step after a save."""
    model = state["model"]
    if batch:
        x = torch.randn(batch, WIDTH, generator=torch.Generator().manual_seed(0))
        state["optimizer"].zero_grad()
        model(x).square().mean().backward()
    else:
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-3) if p.grad is None else p.grad
    state["optimizer"].step()


def _maxrss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def measure(mb: float, reps: int, steps: int, every: int, root: str) -> dict[str, Any]:
    state = build(mb)
    size = state_bytes(state)
    out: dict[str, Any] = {"state_mb": size / 1e6, "reps": reps, "cpus": os.cpu_count()}
    out["load"] = os.getloadavg()[0]
    rows: dict[str, list[float]] = {k: [] for k in ("sync", "blocked", "commit")}
    loops: dict[str, dict[str, list[float]]] = {kind: {k: [] for k in LOOPS} for kind in LOOP_KINDS}
    rss0 = _maxrss_mb(resource.RUSAGE_SELF)
    # One manager per mode for the save rows, as a run has: a thread writer's snapshot
    # buffer is allocated (and page-faulted) by its first save and reused after, so the
    # first save is timed apart ("first"), and the repetitions time the saves after it.
    sync_mgr = CheckpointManager(os.path.join(root, "sync"), keep_last=1)
    async_mgr = CheckpointManager(os.path.join(root, "async"), keep_last=1, async_save=True)
    saves = iter(range(1, 10**6))
    try:
        t0 = time.perf_counter()
        async_mgr.save(next(saves), state)
        out["first_blocked"] = time.perf_counter() - t0
        async_mgr.wait()
        sync_mgr.save(next(saves), state)
        for rep in range(reps):  # interleaved: each repetition measures every row once
            t0 = time.perf_counter()
            sync_mgr.save(next(saves), state)
            rows["sync"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            async_mgr.save(next(saves), state)
            rows["blocked"].append(time.perf_counter() - t0)
            async_mgr.wait()
            rows["commit"].append(time.perf_counter() - t0)
            for kind, batch in LOOP_KINDS.items():
                for mode in LOOPS:
                    where = os.path.join(root, f"{kind}-{mode.replace(', ', '-')}-{rep}")
                    loops[kind][mode].append(_loop(state, mode, steps, every, where, batch))
            print(
                f"rep {rep + 1}/{reps}: sync {rows['sync'][-1]:.2f} s, async blocked "
                f"{rows['blocked'][-1]:.3f} s, committed {rows['commit'][-1]:.2f} s",
                file=sys.stderr,
                flush=True,
            )
            for name in os.listdir(root):
                if name not in ("sync", "async"):
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    finally:
        sync_mgr.close()
        async_mgr.close()
    out["rows"] = rows
    out["loops"] = loops
    out["steps"], out["every"] = steps, every
    out["peak_rss_growth_mb"] = _maxrss_mb(resource.RUSAGE_SELF) - rss0
    out["child_max_rss_mb"] = _maxrss_mb(resource.RUSAGE_CHILDREN)
    return out


# The loop's modes: no saves, sync saves, async saves (the default snapshot) and async
# saves with async_snapshot="rolling" (least memory; each save faults its copy in anew).
LOOPS = {"none": None, "sync": {}, "async": {"async_save": True}}
LOOPS["async, rolling"] = {"async_save": True, "async_snapshot": "rolling"}
# Two loops: optimizer steps only (the step after a save comes at once), and each step
# after a forward and backward of this many rows (the writer streams meanwhile).
LOOP_KINDS = {"optimizer steps only": 0, "forward + backward + step": 64}


def _loop(
    state: dict[str, Any], mode: str, steps: int, every: int, url: str, batch: int = 0
) -> float:
    """Steps per second over ``steps`` steps saving every ``every`` (none: no saves)."""
    mgr = None
    options = LOOPS[mode]
    if options is not None:
        mgr = CheckpointManager(url, keep_last=1, **options)
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        step(state, batch)
        if mgr is not None and i % every == 0:
            mgr.save(i, state)
    if mgr is not None:
        mgr.close()  # the last async save's commit counts too
    return steps / (time.perf_counter() - t0)


def _fmt(values: list[float], unit: str = "s") -> str:
    med = statistics.median(values)
    return f"{med:.3f} {unit} ({min(values):.3f}–{max(values):.3f})"


def table(res: dict[str, Any]) -> str:
    rows, loops = res["rows"], res["loops"]
    sync, blocked = statistics.median(rows["sync"]), statistics.median(rows["blocked"])
    ratio = blocked / sync if sync else float("nan")
    verdict = "PASS" if ratio <= 0.10 else "FAIL"
    lines = [
        f"State {res['state_mb']:.0f} MB (model + AdamW), {res['reps']} interleaved repetitions, "
        f"{res['cpus']} CPUs, load {res['load']:.1f} at the start; medians (min–max).",
        "",
        "| | time | vs sync save |",
        "|---|---:|---:|",
        f"| sync `save()` | {_fmt(rows['sync'])} | 1.00× |",
        f"| async `save()` blocks | {_fmt(rows['blocked'])} | {ratio:.3f}× "
        f"(target ≤ 0.10: {verdict}) |",
        f"| async save until committed (`wait()`) | {_fmt(rows['commit'])} | "
        f"{statistics.median(rows['commit']) / sync:.2f}× |",
        f"| a manager's first async `save()` blocks (a thread writer's buffer is new) | "
        f"{res['first_blocked']:.3f} s | {res['first_blocked'] / sync:.2f}× |",
    ]
    for kind, batch in LOOP_KINDS.items():
        per_mode = loops[kind]
        base = statistics.median(per_mode["none"])
        what = f"a forward and backward of {batch} rows, then" if batch else "only"
        lines += [
            "",
            f"Loop of {res['steps']} steps ({what} an AdamW step), a save every "
            f"{res['every']} (a new manager per loop: its first save included):",
            "",
            "| saves | steps/s | vs no saves |",
            "|---|---:|---:|",
        ]
        for mode in LOOPS:
            med = statistics.median(per_mode[mode])
            lines.append(f"| {mode} | {_fmt(per_mode[mode], '/s')} | {med / base:.2f}× |")
    lines += [
        "",
        f"Peak RSS growth of the process: {res['peak_rss_growth_mb']:.0f} MB; largest forked "
        f"writer's max RSS: {res['child_max_rss_mb']:.0f} MB (RSS counts the pages it "
        "shares with the parent).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_async_save")
    p.add_argument("--mb", type=float, default=500.0, help="state size (model + AdamW)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="loop steps per measurement")
    p.add_argument("--every", type=int, default=5, help="save every N loop steps")
    p.add_argument("--quick", action="store_true", help="a tiny state, one repetition")
    p.add_argument("--json", default=None, help="also write the raw figures here")
    args = p.parse_args(argv)
    if args.quick:
        args.mb, args.reps, args.steps, args.every = 2.0, 1, 4, 2
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    root = tempfile.mkdtemp(prefix="ckptkit-async-bench-")
    try:
        res = measure(args.mb, args.reps, args.steps, args.every, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
