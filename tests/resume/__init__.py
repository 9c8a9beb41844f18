"""Train in pieces == one uninterrupted run: helpers that run ``loop_script.py`` in its own
process, stop it at a chosen marker, and compare what it finally wrote."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SCRIPT = Path(__file__).with_name("loop_script.py")
# Enough for a slow, loaded 2-core machine; a hang ends the process instead of the suite.
PROCESS_TIMEOUT = 120.0

_references: dict[tuple[str, ...], dict[str, Any]] = {}
_counter = itertools.count()
_context: Any = None


@dataclass
class Outcome:
    """One process of a run: its exit code and every line it printed."""

    rc: int
    lines: list[str] = field(default_factory=list)

    def values(self, marker: str) -> list[str]:
        """What follows ``marker`` on each line that starts with it."""
        return [line.split(" ", 1)[1] for line in self.lines if line.startswith(marker + " ")]

    def steps(self, marker: str) -> list[int]:
        return [int(v.split()[0]) for v in self.values(marker)]

    def last(self, marker: str) -> int:
        """The largest step after ``marker``, 0 if the marker never appeared."""
        return max(self.steps(marker), default=0)

    @property
    def resumed(self) -> int | None:
        """The step this process resumed from; None when it started fresh."""
        steps = self.steps("RESUMED")
        return steps[0] if steps else None

    def text(self) -> str:
        return "\n".join(self.lines[-60:])


def run_script(run: Path, out: Path, *args: str, **how: Any) -> Outcome:
    """``loop_script.py --run RUN --out OUT ARGS`` once; see ``run_python`` for ``how``."""
    return run_python(
        SCRIPT, "--run", str(run), "--out", str(out), *args, log_dir=run.parent, **how
    )


def run_python(
    script: Path,
    *argv: str,
    log_dir: Path,
    stops: Sequence[tuple[Callable[[str], bool], int]] = (),
    whole_group: bool = True,
    exec_python: bool = False,
) -> Outcome:
    """Run ``python SCRIPT ARGV`` once in its own process (the same command every time, as
    a retry loop would) and collect what it prints.

    ``stops`` are ``(predicate, signal)`` pairs: when a predicate first returns True for a
    printed line, its signal goes to the process, or with ``whole_group`` to its process
    group (its DataLoader workers too), as a machine going away or a scheduler signalling a
    whole job does.

    By default the process is forked from a server that has already imported torch (an
    optimizer's first use alone imports torch._dynamo: seconds per process). It is still a
    separate process with its own session, signal handlers and DataLoader workers, and the
    script runs as ``__main__`` with ``sys.argv`` set, as from the shell.
    ``exec_python=True`` starts a new interpreter instead.
    """
    log = log_dir / f"{script.stem}.{next(_counter)}.log"
    if exec_python:
        with open(log, "wb") as sink:
            proc: Any = subprocess.Popen(
                [sys.executable, str(script), *argv],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env={**os.environ, "CKPTKIT_DISABLE_PLUGIN_AUTOLOAD": "1"},
                start_new_session=True,
            )

        def alive() -> bool:
            return proc.poll() is None
    else:
        proc = _forkserver().Process(target=_child, args=(str(script), list(argv), str(log)))
        proc.start()
        alive = proc.is_alive
    timed_out = threading.Event()

    def hung() -> None:
        timed_out.set()
        _signal(proc.pid, signal.SIGKILL, True)

    watchdog = threading.Timer(PROCESS_TIMEOUT, hung)
    watchdog.start()
    lines: list[str] = []
    pending = list(stops)
    try:
        for line in _follow(log, alive):
            lines.append(line)
            # Every predicate sees every line (they count markers); each fires once.
            fired = [stop for stop in pending if stop[0](line)]
            for stop in fired:
                pending.remove(stop)
                _signal(proc.pid, stop[1], whole_group)
        if exec_python:
            rc = proc.wait()
        else:
            proc.join()
            rc = proc.exitcode
    finally:
        watchdog.cancel()
        _signal(proc.pid, signal.SIGKILL, True)  # never leave workers behind
    outcome = Outcome(rc, lines)
    # A hang must not pass for a kill the test asked for.
    assert not timed_out.is_set(), (
        f"{script.name} hung for {PROCESS_TIMEOUT:.0f} s:\n{outcome.text()}"
    )
    return outcome


def _child(script: str, argv: list[str], log: str) -> None:
    """A forked run: its own session (so a test can signal the whole group), output to
    ``log``, then the script as ``__main__``, as if started from the shell."""
    os.setsid()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ["CKPTKIT_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    # A forkserver child inherits "forkserver" as its start method; a script started from
    # the shell has the platform default, which its DataLoader workers must use too.
    multiprocessing.set_start_method(None, force=True)
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")  # the script's sys.exit(code) ends it


def _forkserver() -> Any:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["torch._dynamo", "tests.resume.loop_script"])
    return _context


def _follow(log: Path, alive: Callable[[], bool]) -> Iterator[str]:
    """Lines of ``log`` as they are written, until the process is gone."""
    while not log.exists():
        if not alive() and not log.exists():
            return
        time.sleep(0.005)
    with open(log, encoding="utf-8", errors="replace") as f:
        pending = ""
        while True:
            chunk = f.readline()
            if chunk:
                pending += chunk
                if pending.endswith("\n"):
                    yield pending.rstrip("\n")
                    pending = ""
            elif alive():
                time.sleep(0.005)
            else:
                yield from (pending + f.read()).splitlines()
                return


def _signal(pid: int, sig: int, whole_group: bool) -> None:
    try:
        if whole_group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_to_completion(run: Path, out: Path, *args: str, max_tries: int = 10) -> list[Outcome]:
    """Rerun the same command while it exits 75 (a retry loop); returns every process."""
    outcomes: list[Outcome] = []
    for _ in range(max_tries):
        outcomes.append(run_script(run, out, *args))
        if outcomes[-1].rc != 75:
            break
    assert outcomes[-1].rc == 0, f"the run did not finish:\n{outcomes[-1].text()}"
    return outcomes


def reference(root: Path, *args: str) -> dict[str, Any]:
    """The final state of one uninterrupted run with ``args``, started as
    ``python loop_script.py`` (computed once per session)."""
    key = tuple(args)
    if key not in _references:
        n = len(_references)
        run, out = root / f"reference-{n}", root / f"reference-{n}.pt"
        outcome = run_script(run, out, *args, exec_python=True)
        assert outcome.rc == 0, f"the uninterrupted run failed:\n{outcome.text()}"
        assert outcome.steps("RESUMED") == [], "the uninterrupted run did not start fresh"
        _references[key] = load_final(out)
    return _references[key]


def load_final(out: Path) -> dict[str, Any]:
    return torch.load(out, weights_only=True)


def assert_same_run(expected: dict[str, Any], got: dict[str, Any], context: str = "") -> None:
    """The per-step log is identical line by line and every final tensor is bit-equal."""
    log_a, log_b = expected["log"], got["log"]
    first = next((i for i, (a, b) in enumerate(zip(log_a, log_b, strict=False)) if a != b), None)
    if first is None and len(log_a) != len(log_b):
        first = min(len(log_a), len(log_b))
    assert first is None, (
        f"{context}\nper-step logs differ from entry {first}:\n"
        f"  uninterrupted: {log_a[first : first + 3]}\n  in pieces:     {log_b[first : first + 3]}"
    )
    for key in ("model", "optimizer", "scheduler", "scaler", "early_stopping", "step"):
        diff = first_difference(expected[key], got[key], key)
        assert diff is None, f"{context}\nfinal state differs at {diff}"


def first_difference(a: Any, b: Any, where: str) -> str | None:
    """Where nested state ``a`` and ``b`` first differ (tensors bit for bit), or None."""
    if isinstance(a, torch.Tensor):
        ok = isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return None if ok else where
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return f"{where} (keys)"
        return next((d for k in a if (d := first_difference(a[k], b[k], f"{where}[{k!r}]"))), None)
    if isinstance(a, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return f"{where} (length)"
        pairs = enumerate(zip(a, b, strict=True))
        return next(
            (d for i, (x, y) in pairs if (d := first_difference(x, y, f"{where}[{i}]"))), None
        )
    return None if a == b else f"{where}: {a!r} != {b!r}"
