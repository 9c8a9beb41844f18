"""Peak extra memory of one save, each measured in a fresh process.

A probe process (``python -m bench.memory --probe METHOD --mb N --dir D``) saves a tiny
state the same way first (so that lazy imports are not counted), builds the state,
resets its peak RSS to the current RSS (``/proc/self/clear_refs``), saves it and
reports:

- the growth of its own peak RSS (``VmHWM`` minus the RSS before the save);
- the largest PSS seen, summed over its child processes, sampled every few ms from
  ``/proc/<child>/smaps_rollup`` while the save runs (a fork-based async writer shares
  the parent's pages copy-on-write: PSS counts each shared page half to each, RSS would
  count it twice), and ``ru_maxrss`` of its waited-for children for reference.

An async save is measured until it is committed (``save()`` then ``wait()``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._harness import NA, REPO, Target, mb, table

METHODS = {
    "raw": "raw write + fsync",
    "torch": "torch.save + fsync",
    "safetensors": "safetensors save_file + fsync",
    "dcp": "torch.distributed.checkpoint.save",
    "ckptkit": "ckptkit save (sync)",
    "ckptkit-async": "ckptkit save (async), until committed",
    "ckptkit-rolling": "ckptkit save (async, `async_snapshot='rolling'`), until committed",
    "step": "an AdamW step alone, no save (its own temporaries: the row below has them too)",
    "ckptkit-async-step": "ckptkit save (async), an AdamW step right after `save()`, "
    "until committed",
}
ASYNC = {
    "ckptkit-async": {},
    "ckptkit-rolling": {"async_snapshot": "rolling"},
    "ckptkit-async-step": {},
}
# The worst case of an async save's memory: the loop's next step comes before the writer
# has written anything, so all of the state it will change is copied (or, with the fork
# writer, each page it writes is copied on write) while the save is in flight.
STEP_AFTER = {"step", "ckptkit-async-step"}


# -- inside the probe process -----------------------------------------------------------
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields start after the last ")".
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry))
    return out


def _rollup_kb(pid: int) -> tuple[int, int]:
    """(PSS, private) of a process, in kB; zeros once it has exited."""
    pss = private = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
            elif line.startswith(("Private_Clean:", "Private_Dirty:")):
                private += int(line.split()[1])
    except OSError:  # it exited between the listing and the read
        pass
    return pss, private


class ChildPss:
    """Samples the summed PSS (and private memory) of this process's children in a
    thread; keeps the peaks."""

    def __init__(self, every: float = 0.005) -> None:
        self.peak_kb = 0
        self.peak_private_kb = 0
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            found = [_rollup_kb(c) for c in _children(me)]
            self.peak_kb = max(self.peak_kb, sum(p for p, _ in found))
            self.peak_private_kb = max(self.peak_private_kb, sum(q for _, q in found))
            self._stop.wait(self._every)

    def __enter__(self) -> ChildPss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _saver(method: str, model: Any, opt: Any, root: Path, stack: ExitStack) -> Any:
    from bench import _writers

    if method == "raw":
        buffers = _writers.raw_buffers(model, opt)
        return lambda: _writers.raw_write(buffers, root / "state.bin")
    if method == "step":
        _with_gradients(model)
        return opt.step
    if method in ("torch", "safetensors", "dcp"):
        fn = {
            "torch": _writers.torch_save,
            "safetensors": _writers.safetensors_save,
            "dcp": _writers.dcp_save,
        }[method]
        return lambda: fn(model, opt, root)
    mgr = _writers.manager(str(root / "run"), async_save=method in ASYNC, **ASYNC.get(method, {}))
    stack.callback(mgr.close)
    state = _writers.ckptkit_state(model, opt)
    steps = iter(range(1, 1000))
    step_after = method in STEP_AFTER
    if step_after:
        _with_gradients(model)

    def save() -> None:
        mgr.save(next(steps), state)
        if step_after:
            opt.step()
        mgr.wait()

    return save


def _with_gradients(model: Any) -> None:
    """Give every parameter a gradient: they exist before a save, as in a loop."""
    import torch

    for p in model.parameters():
        p.grad = torch.empty_like(p).normal_(0, 1e-3)


def probe(method: str, megabytes: float, root: Path) -> dict[str, Any]:
    from bench import _state

    with ExitStack() as stack:
        # Warm up on a tiny state: imports and first-use code paths are not counted.
        (root / "warm").mkdir(parents=True, exist_ok=True)
        _saver(method, *_state.build(0.5), root / "warm", stack)()
        model, opt = _state.build(megabytes)
        (root / "real").mkdir(parents=True, exist_ok=True)
        save = _saver(method, model, opt, root / "real", stack)
        gc.collect()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
            before_kb, reset = _status_kb("VmRSS"), True
        except OSError:  # no clear_refs here: the peak so far is the baseline
            before_kb, reset = _status_kb("VmHWM"), False
        with ChildPss() as children:
            save()
        peak_kb = _status_kb("VmHWM")
    return {
        "method": method,
        "state_bytes": _state.nbytes(model, opt),
        "growth_bytes": max(0, peak_kb - before_kb) * 1024,
        "child_pss_bytes": children.peak_kb * 1024,
        "child_private_bytes": children.peak_private_kb * 1024,
        "child_maxrss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "peak_reset": reset,
    }


# -- the harness side -------------------------------------------------------------------
@dataclass
class MemoryResult:
    method: str
    state_bytes: int
    growth_bytes: int
    child_pss_bytes: int
    child_private_bytes: int
    child_maxrss_bytes: int
    peak_reset: bool


def run_probes(methods: list[str], megabytes: float, timeout: float = 900) -> list[MemoryResult]:
    """The probes of ``methods``, one after the other in one fresh process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="ckptkit-bench-mem-") as root:
        cmd = [sys.executable, "-m", "bench.memory", "--probe", ",".join(methods)]
        cmd += ["--mb", str(megabytes), "--dir", root]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {methods} failed:\n{proc.stderr[-3000:]}")
    lines = proc.stdout.strip().splitlines()[-len(methods) :]
    return [MemoryResult(**json.loads(line)) for line in lines]


def measure(megabytes: float, *, together: bool = False) -> dict[str, MemoryResult | None]:
    """Every method's probe, each in a fresh process (``together``: all in one, after a
    peak reset each: quicker, but what an earlier save left allocated may hide growth).
    Methods not in this build get None."""
    from bench import _writers

    available = [m for m in METHODS if m not in ASYNC or _writers.has_snapshot(ASYNC[m])]
    if together:
        found = run_probes(available, megabytes)
    else:
        found = [r for m in available for r in run_probes([m], megabytes)]
    by_method = {r.method: r for r in found}
    return {m: by_method.get(m) for m in METHODS}


def tables(results: dict[float, dict[str, MemoryResult | None]]) -> tuple[list[str], list[Target]]:
    blocks, targets = [], []
    for per_method in results.values():
        known = [r for r in per_method.values() if r is not None]
        if not known:
            continue
        state = known[0].state_bytes
        rows = []
        for method, r in per_method.items():
            if r is None:
                rows.append([METHODS[method], NA, "", "", "", ""])
                continue
            total = r.growth_bytes + r.child_pss_bytes
            rows.append(
                [
                    METHODS[method],
                    mb(r.growth_bytes),
                    mb(r.child_pss_bytes),
                    f"{mb(total)} ({total / state:.0%})",
                    mb(r.child_private_bytes),
                    mb(r.child_maxrss_bytes),
                ]
            )
        blocks += [
            f"### {mb(state)} state",
            table(
                [
                    "save",
                    "peak RSS growth",
                    "children's peak PSS",
                    "extra memory = growth + PSS (share of the state)",
                    "children's private memory",
                    "children's ru_maxrss",
                ],
                rows,
                "lrrrrr",
            ),
        ]
        if not all(r.peak_reset for r in known):
            blocks.append(
                "(/proc/self/clear_refs was not writable: growth is over the peak so far)"
            )
        targets += _targets(per_method, state)
    return blocks, targets


def _targets(per_method: dict[str, MemoryResult | None], state: int) -> list[Target]:
    size = mb(state)
    limit = max(64e6, 0.05 * state)
    out = []
    sync = per_method.get("ckptkit")
    if sync is not None:
        extra = sync.growth_bytes + sync.child_pss_bytes
        out.append(
            Target(
                f"{size}: sync save needs ≤ max(64 MB, 5 % of the state) = {mb(limit)} extra",
                mb(extra),
                extra <= limit,
            )
        )
    for method, how in (("ckptkit-async", ""), ("ckptkit-rolling", " (rolling)")):
        goal = f"{size}: async save{how} needs ≤ one copy of the state ({mb(state)}) extra"
        asyn = per_method.get(method)
        if asyn is None:
            out.append(Target(goal, NA, None))
        else:
            extra = asyn.growth_bytes + asyn.child_pss_bytes
            out.append(Target(goal, mb(extra), extra <= state))
    # The step-right-after row has no target of its own: it is what a step that changes
    # all of the state during the save costs on either path (a copy of what is not
    # written, or copy-on-write faults), shown beside the save's own figure.
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one memory probe (used by python -m bench)")
    parser.add_argument("--probe", required=True, help="methods, comma-separated")
    parser.add_argument("--mb", type=float, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args(argv)
    import warnings

    warnings.simplefilter("ignore")
    for method in args.probe.split(","):
        if method not in METHODS:
            parser.error(f"unknown method {method!r}: pick from {', '.join(METHODS)}")
        started = time.perf_counter()
        out = probe(method, args.mb, args.dir / method)
        print(f"probe {method} took {time.perf_counter() - started:.1f} s", file=sys.stderr)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
