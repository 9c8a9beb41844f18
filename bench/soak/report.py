"""docs/RELIABILITY.md from a soak's results (and the same facts as JSON for tests)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.soak.cases import FAIL, PASS, SKIP, Case
from bench.soak.trials import ELSEWHERE, PHASES, Trial

ROWS = {
    "local": "SIGKILL, local disk",
    "drive": "SIGKILL, drive:// (upload queue)",
    "gs": "SIGKILL, gs:// (emulator)",
}
EMULATOR_ROW = "GCS emulator killed mid-upload, restarted"


@dataclass
class Run:
    """Everything a report says, gathered by the runner."""

    trials_asked: int
    seed: int
    quick: bool
    storages: list[str]
    jobs: int
    started: float
    seconds: float
    trials: list[Trial]
    cases: list[Case]
    notes: list[str] = field(default_factory=list)
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)
    trial_seconds: float = 0.0  # wall time of the kill trials alone

    @property
    def kills(self) -> list[Trial]:
        return [t for t in self.trials if t.landed is not None]

    @property
    def failed(self) -> bool:
        return any(t.problems for t in self.trials) or any(c.outcome == FAIL for c in self.cases)

    def landed(self) -> Counter[str]:
        return Counter(t.landed for t in self.kills)


def commit_of(repo: Path, out: Path) -> str:
    """``git rev-parse HEAD``, plus "dirty" when anything but the report itself differs."""

    def git(*args: str) -> str:
        res = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
        return res.stdout.strip() if res.returncode == 0 else ""

    head = git("rev-parse", "HEAD") or "unknown"
    try:
        rel = str(out.resolve().relative_to(repo.resolve()))
    except ValueError:
        rel = ""
    spec = ["--", "."] + ([f":!{rel}"] if rel else [])
    dirty = git("status", "--porcelain", "--untracked-files=no", *spec)
    return f"{head} (dirty)" if dirty else head


def _row_stats(trials: list[Trial]) -> dict[str, Any]:
    kills = [t for t in trials if t.landed is not None]
    landed = Counter(t.landed for t in kills)
    finals = [t for t in trials if t.note == "finished"]
    return {
        "trials": len([t for t in trials if t.kind != "final"]),
        "kills": len(kills),
        "failed": sum(1 for t in trials if t.problems),
        "landed": {p: landed.get(p, 0) for p in (*PHASES, ELSEWHERE)},
        "chains": len(finals),
        "identical": sum(1 for t in finals if not t.problems),
        "seconds": sum(t.seconds for t in trials),
    }


def rows(run: Run) -> list[dict[str, Any]]:
    """One row per fault or input: the kill trials per storage, the emulator kills,
    then each case."""
    out: list[dict[str, Any]] = []
    for storage in run.storages:
        mine = [t for t in run.trials if t.storage == storage and t.kind != "emulator"]
        if mine:
            out.append({"row": ROWS.get(storage, storage), "storage": storage, **_row_stats(mine)})
    emu = [t for t in run.trials if t.kind == "emulator"]
    if emu:
        notes = Counter(t.note for t in emu)
        out.append({"row": EMULATOR_ROW, "storage": "gs", **_row_stats(emu), "notes": dict(notes)})
    for row in out:
        row["outcome"] = PASS if not row["failed"] else FAIL
    for case in run.cases:
        out.append({"row": case.name, "item": case.item, "trials": 1, "outcome": case.outcome})
    return out


def to_json(run: Run) -> dict[str, Any]:
    return {
        "seed": run.seed,
        "trials_asked": run.trials_asked,
        "quick": run.quick,
        "storages": run.storages,
        "seconds": run.seconds,
        "trial_seconds": run.trial_seconds,
        "landed": dict(run.landed()),
        "rows": rows(run),
        "cases": [asdict(c) for c in run.cases],
        "problems": [
            {
                "storage": t.storage,
                "kind": t.kind,
                "target": t.target,
                "landed": t.landed,
                "problems": t.problems,
                "trace": t.trace,
            }
            for t in run.trials
            if t.problems
        ],
        "failed": run.failed,
        "notes": run.notes,
    }


def _cell(n: int) -> str:
    return str(n) if n else "0"


def markdown(run: Run, commit: str, command: str) -> str:
    kills = run.kills
    trials = [t for t in run.trials if t.kind != "final"]
    per_trial = run.trial_seconds / max(1, len(trials))
    process = sum(t.seconds for t in run.trials) / max(1, len(run.trials))
    failing_cases = [c for c in run.cases if c.outcome == FAIL]
    failing_trials = [t for t in run.trials if t.problems]
    verdict = (
        "all trials and cases held"
        if not run.failed
        else (f"FAILED: {len(failing_trials)} trial(s), {len(failing_cases)} case(s)")
    )
    lines = [
        "# Reliability",
        "",
        "<!-- Generated by `python -m bench.soak`; do not edit by hand, rerun it. -->",
        "",
        f"Generated by `{command}`: real training processes SIGKILLed inside a save, a "
        "commit, a rotation or a restore, and resumed, on each storage; then the fault and "
        "hostile-input cases. See [How the soak works](#how-the-soak-works).",
        "",
        "| | |",
        "|---|---|",
        f"| commit | `{commit}` |",
        f"| date | {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(run.started))} |",
        f"| N (trials asked) | {run.trials_asked}{' (--quick)' if run.quick else ''} |",
        f"| seed | {run.seed} |",
        f"| machine | {os.cpu_count()} CPUs, load {run.load[0]:.1f} / {run.load[1]:.1f} / "
        f"{run.load[2]:.1f} at start, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()} |",
        f"| duration | {run.seconds:.0f} s in all; kill trials {run.trial_seconds:.0f} s: "
        f"{per_trial:.2f} s per trial with {run.jobs} jobs, {process:.2f} s per worker process |",
        f"| kills | {len(kills)} in {len(trials)} trials |",
        f"| result | {verdict} |",
        "",
        "## Results",
        "",
        "One row per fault or input. Kill columns: the phase each kill landed in (the phase "
        "the worker last reported and had not reported leaving).",
        "",
        "| fault or input | item | trials | outcome | save | commit | rotation | restore "
        "| elsewhere | runs finished bit-identical |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows(run):
        if "landed" in row:
            landed = row["landed"]
            phases = " | ".join(_cell(landed[p]) for p in (*PHASES, ELSEWHERE))
            same = (
                f"{row['identical']} of {row['chains']}" if row["chains"] else "(in the gs:// row)"
            )
            outcome = row["outcome"] + (f" ({row['failed']} failed)" if row["failed"] else "")
            lines.append(f"| {row['row']} | 9 | {row['trials']} | {outcome} | {phases} | {same} |")
        else:
            lines.append(
                f"| {row['row']} | {row['item']} | 1 | {row['outcome']} | - | - | - | - | - | - |"
            )
    lines += ["", "## Kills by phase", "", "| phase | aimed at | landed |", "|---|---:|---:|"]
    aimed = Counter(t.target for t in trials if t.kind == "kill")
    landed_all = run.landed()
    for phase in (*PHASES, "random", ELSEWHERE):
        lines.append(f"| {phase} | {aimed.get(phase, 0)} | {landed_all.get(phase, 0)} |")
    emu = [t for t in run.trials if t.kind == "emulator"]
    if emu:
        notes = Counter(t.note for t in emu)
        lines += [
            "",
            "Emulator kills: "
            + ", ".join(f"{n} {what}" for what, n in sorted(notes.items()))
            + " (then the worker was SIGKILLed at its next commit and the run resumed).",
        ]
    lines += [
        "",
        "## Fault and hostile-input cases",
        "",
        "| case | item | expected | observed | outcome |",
        "|---|---|---|---|---|",
    ]
    for c in run.cases:
        observed = c.observed.replace("|", "\\|")
        lines.append(f"| {c.name} | {c.item} | {c.expected} | {observed} | {c.outcome} |")
    if failing_trials:
        lines += [
            "",
            "## Failed trials",
            "",
            "What each worker said is in the `--json` output.",
            "",
        ]
        for t in failing_trials[:30]:
            points = [m for m in t.trace if m.startswith("this: point")]
            last = f" (its last point: `{points[-1][len('this: point ') :]}`)" if points else ""
            lines.append(
                f"- {t.storage}, {t.kind} aimed at {t.target} ({t.mode}), landed in "
                f"{t.landed}{last}: {'; '.join(t.problems)}"
            )
        if len(failing_trials) > 30:
            lines.append(f"- ... and {len(failing_trials) - 30} more")
    if run.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in run.notes]
    lines += ["", *_HOW.strip("\n").splitlines(), ""]
    return "\n".join(lines)


_HOW = f"""
## How the soak works

Each trial is one process of a training run (a small MLP, AdamW, OneCycleLR, Dropout, a
`CheckpointManager` with `keep_last=2`, a save every 2 of 40 steps, `resume="auto"`),
forked from a server that has imported torch once. The worker reports every phase change
and every storage call inside a phase (a ckptkit plugin on `ckptkit_before_save`,
`ckptkit_after_commit`, `ckptkit_before_delete`, `ckptkit_after_restore`, and wrappers
around the storage backend's calls). The runner aims each kill at the n-th such point of a
phase: half of the time the worker stops dead there until the SIGKILL arrives, otherwise it
goes on and is killed 0-4 ms later (inside a write, a rename, an upload); one aim in five
is a kill at a random instant. On Drive the upload of the checkpoint's files counts as
save, that of its manifest as commit, and queued deletes as rotation; a replay of a dead
process's uploads counts as restore.

After every kill, read-only and without repairing anything: every checkpoint the run lists
verifies (sizes and sha256), the newest is at least the newest any worker reported
committed, every checkpoint reported committed is still there unless rotation announced
deleting it (with `keep_last` newer ones present), every restore returned exactly the state
saved at that step (a sha256 of weights, optimizer, schedule and RNG taken at save and at
restore), and no worker started fresh on a run with checkpoints. A chain of such trials
ends with a worker that trains to the end; its final state must be bit-identical to an
uninterrupted run of the same seed. Phases: {", ".join(PHASES)}; "{ELSEWHERE}" is training,
start-up or closing. `{SKIP}` marks a case this machine cannot set up, with the reason.
"""
