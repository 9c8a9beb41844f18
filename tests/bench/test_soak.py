"""``python -m bench.soak --quick``: real training processes SIGKILLed in every phase on
local disk, drive:// and gs://, resumed, checked; the report is generated from the run.

One real run of the runner (about 20 kills and the fast cases) as a subprocess, the way a
user runs it; the assertions read its JSON results and the markdown it wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.soak.trials import PHASES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

REPO = Path(__file__).resolve().parents[2]
SEED = 20261201

# Cases that fail on the code this test was written against, each until the fix of the
# item named lands (other branches). When a fix is merged, delete its entries: the test
# then requires those cases to pass. Every other case must pass (or be skipped with a
# reason, e.g. no tmpfs) today.
PENDING_FIXES: dict[str, str] = {
    "symlinked member to a secret file": "item 2: confinement",
    "symlinked checkpoint directory": "item 2: confinement",
    "FIFO member": "item 2: confinement",
    "malformed manifest fields": "item 3: typed manifest",
    "full disk": "item 6: full-disk errors",
    "vanished Drive mount": "item 1: Drive mounts",
    "dead GCS endpoint": "item 5: GCS timeouts",
    "mismatched-optimizer restore": "item 4: all-or-nothing restore",
    "legacy dict checkpoint keys": "item 7: legacy keys",
    "verify on a damaged checkpoint": "item 8: exit codes",
    "resume auto with every checkpoint damaged": "item 8: honest status",
}


# Kill outcomes today's code does not guarantee yet, each until the fix named lands.
# A SIGKILL while a new writer replays a dead one's Drive uploads can catch the replay
# rewriting a file already on Drive in place (a committed manifest truncated, so the
# checkpoint is invisible until the next replay): about 1 kill in 450 on drive://.
PENDING_TRIAL_PROBLEMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("drive", "restore"): ("latest is step", "committed and not rotated, yet gone"),
}


def _pending(problem: dict[str, Any]) -> bool:
    allowed = PENDING_TRIAL_PROBLEMS.get((problem["storage"], problem["landed"]), ())
    return all(any(p.startswith(a) for a in allowed) for p in problem["problems"])


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("soak")
    report, results = out / "RELIABILITY.md", out / "soak.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--quick", "--seed", str(SEED)]
        + ["--out", str(report), "--json", str(results)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=380,
    )
    assert results.exists(), f"the soak wrote no results:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return {"rc": proc.returncode, "data": json.loads(results.read_text()), "report": report}


def test_every_phase_was_hit(soak: dict[str, Any]) -> None:
    landed = soak["data"]["landed"]
    missed = [p for p in PHASES if not landed.get(p)]
    assert not missed, f"no kill landed in {missed}: {landed}"


def test_no_kill_lost_or_damaged_anything(soak: dict[str, Any]) -> None:
    data = soak["data"]
    unexpected = [p for p in data["problems"] if not _pending(p)]
    assert unexpected == [], unexpected
    kill_rows = [r for r in data["rows"] if "landed" in r]
    assert {r["storage"] for r in kill_rows} >= {"local", "drive"}
    pending = len(data["problems"]) - len(unexpected)
    assert sum(r["failed"] for r in kill_rows) == pending
    for row in kill_rows:
        assert row["trials"] >= 1, row
        # Every run that was finished after its kills ended bit-identical to the
        # uninterrupted one (the emulator row's runs are finished in the gs row).
        assert row["identical"] == row["chains"], row
    finished = sum(r["chains"] for r in kill_rows)
    assert finished >= 2, "no killed run was finished and compared"
    assert sum(r["trials"] for r in kill_rows) >= 20


def test_cases_pass_except_those_pending_a_fix(soak: dict[str, Any]) -> None:
    cases = {c["name"]: c for c in soak["data"]["cases"]}
    assert set(PENDING_FIXES) <= set(cases), "a pending case was renamed or removed"
    wrong = [
        f"{name}: {c['outcome']} ({c['observed']})"
        for name, c in cases.items()
        if name not in PENDING_FIXES and c["outcome"] not in ("PASS", "SKIP")
    ]
    assert not wrong, wrong
    # The runner is honest about failures: non-zero exactly when something failed.
    failing = any(c["outcome"] == "FAIL" for c in cases.values()) or soak["data"]["problems"]
    assert soak["rc"] == (1 if failing else 0)


def test_the_report_is_generated_from_the_run(soak: dict[str, Any]) -> None:
    text = soak["report"].read_text()
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert f"`{head}" in text
    assert f"| seed | {SEED} |" in text
    assert "| N (trials asked) | 20 (--quick) |" in text
    for case in soak["data"]["cases"]:
        assert f"| {case['name']} |" in text
    for phase in PHASES:
        assert f"| {phase} |" in text
