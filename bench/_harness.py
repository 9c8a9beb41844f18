"""What every benchmark shares: interleaved repetitions, medians with their spread, the
machine's description, PASS/FAIL targets and the markdown tables they are written into.

One home for each of these, so that every table under ``bench/results/`` says the same
things the same way (and a fix to how we time lands everywhere at once).
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
NA = "n/a (not in this build)"


def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn()`` takes (wall clock: the disk and other processes count)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass
class Samples:
    """Repeated measurements of one figure; shown as the median and the min–max."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    def scaled(self, factor: float) -> Samples:
        return Samples([v * factor for v in self.values])

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def show(self, unit: str = "s", scale: float = 1.0, digits: int = 2) -> str:
        """``0.45 s (0.41–0.52)``: the median, then the spread when there are several."""
        if not self.values:
            return "–"
        med = f"{self.median * scale:.{digits}f}"
        if len(self.values) == 1:
            return f"{med} {unit}"
        lo, hi = min(self.values) * scale, max(self.values) * scale
        return f"{med} {unit} ({lo:.{digits}f}–{hi:.{digits}f})"


def interleaved(
    cases: Mapping[str, Callable[[], object]],
    reps: int,
    *,
    before: Callable[[str], None] | None = None,
    after: Callable[[str], None] | None = None,
    warmup: bool = True,
) -> dict[str, Samples]:
    """Run every case once per repetition, rotating the order each time, so that machine
    noise (other processes, a page cache that fills, thermal drift) hits every case alike
    and no case always runs first or last. Each call is timed whole (what it returns is
    ignored); ``before``/``after`` run untimed around it (reset the state, check what it
    produced). With ``warmup`` one untimed round runs first, so that lazy imports and
    first-use allocations are not counted in any repetition."""
    names = list(cases)
    out = {name: Samples() for name in names}
    for rep in range(-1 if warmup else 0, reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            if before is not None:
                before(name)
            elapsed = timed(cases[name])
            if rep >= 0:
                out[name].add(elapsed)
            if after is not None:
                after(name)
    return out


@dataclass
class Target:
    """One of the issue's targets: what it asks, what was measured, and the verdict
    (None when the figure could not be measured in this build)."""

    goal: str
    measured: str
    passed: bool | None

    @property
    def verdict(self) -> str:
        return "n/a" if self.passed is None else ("PASS" if self.passed else "FAIL")


def table(headers: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> str:
    """A markdown table; ``align`` has one letter per column (``l`` or ``r``, default l)."""
    marks = ["---:" if (align[i : i + 1] == "r") else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def targets_table(targets: Sequence[Target]) -> str:
    return table(
        ["target", "measured", "verdict"],
        [(t.goal, t.measured, f"**{t.verdict}**") for t in targets],
    )


def targets_in(text: str) -> list[tuple[str, str, str]]:
    """The (target, measured, verdict) rows of the targets table in a written table."""
    rows, inside = [], False
    for line in text.splitlines():
        if line.startswith("## "):
            inside = line == "## Targets"
        elif inside and line.startswith("| ") and not line.startswith("| target |"):
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if len(cells) == 3:
                rows.append((cells[0], cells[1], cells[2]))
    return rows


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip() or "unknown"
    return commit + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


@dataclass(frozen=True)
class Machine:
    """Where and when a run happened, taken once at its start (the load average is the
    one before the benchmark itself adds to it)."""

    load: tuple[float, float, float]
    cpus: int
    torch: str
    python: str
    commit: str
    date: str
    command: str

    @classmethod
    def now(cls, argv: Sequence[str] | None = None) -> Machine:
        import torch

        argv = sys.argv[1:] if argv is None else argv
        return cls(
            load=os.getloadavg(),
            cpus=os.cpu_count() or 1,
            torch=torch.__version__,
            python=platform.python_version(),
            commit=git_commit(),
            date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            command=" ".join(["python -m bench", *map(shlex.quote, argv)]),
        )

    def header(self) -> str:
        one, five, fifteen = self.load
        return (
            f"`{self.command}` at git {self.commit}, {self.date}: torch {self.torch}, "
            f"Python {self.python}, {self.cpus} CPUs, load average {one:.2f} / {five:.2f} / "
            f"{fifteen:.2f} (1 / 5 / 15 min) at the start. A shared machine: other work "
            "slows every row of a table alike, since the rows are interleaved."
        )


def write(out_dir: Path, name: str, title: str, machine: Machine, body: Sequence[str]) -> Path:
    """Write ``out_dir/name.md``: the title, the machine line, then ``body``'s blocks."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.md"
    text = "\n\n".join([f"# {title}", machine.header(), *body]) + "\n"
    path.write_text(text)
    return path


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def fmt_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.0f} MB" if nbytes >= 10e6 else f"{nbytes / 1e6:,.1f} MB"
