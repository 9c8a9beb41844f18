"""SIGKILL at random moments, then the same command again, until the run finishes: the
result is bit-identical to one uninterrupted run.

The kill points are drawn from a seeded RNG; set CKPTKIT_KILL_SEED to replay a failure
(the seed is printed and repeated in every assertion message).
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from ckptkit import CheckpointManager
from tests.resume import assert_same_run, load_final, reference, run_script

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# Each process is killed where it holds (see loop_script --hold): exactly there, every time.
KILL_POINTS = {
    "after an optimizer step": ("STEP", 6),  # the n-th step this process makes, n <= 6
    "between micro-batches": ("MICRO", 6),  # gradients accumulated, not yet applied
    "during a save": ("SAVING", 6),  # about to write a file of a commit (3 per commit)
    "during validation": ("VALIDATING", 1),
}


def kill_point(point: str, rng: random.Random) -> tuple[str, Callable[[str], bool]]:
    """The --hold argument for ``point`` and a predicate for the line it holds after."""
    marker, most = KILL_POINTS[point]
    nth, seen = rng.randint(1, most), 0

    def held(line: str) -> bool:
        nonlocal seen
        seen += line.split(" ", 1)[0] == marker
        return seen == nth

    return f"{marker}:{nth}", held


def test_sigkill_anywhere_then_resume_equals_uninterrupted(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    seed = int(os.environ.get("CKPTKIT_KILL_SEED", random.randrange(2**32)))
    print(f"kill seed {seed} (CKPTKIT_KILL_SEED={seed} replays it)")
    rng = random.Random(seed)
    expected = reference(tmp_path_factory.getbasetemp())
    plan = list(KILL_POINTS)
    rng.shuffle(plan)

    run, out = tmp_path / "run", tmp_path / "final.pt"
    committed = 0  # newest step any process reported committed ("SAVED n")
    history: list[str] = []
    for point in plan:
        hold, held = kill_point(point, rng)
        killed = run_script(run, out, "--hold", hold, stops=[(held, signal.SIGKILL)])
        context = f"kill seed {seed}; kills so far: {history + [point]}\n{killed.text()}"
        assert killed.rc == -9, f"the kill {point!r} did not land: {context}"
        history.append(f"{point} at {hold} (resumed {killed.resumed})")
        # The process stood still at the marker, so exactly the checkpoints it reported
        # committed exist; one it was writing stays invisible (atomic or nothing).
        committed = max(committed, killed.last("SAVED"))
        assert _newest_step(run) == committed, (
            f"newest checkpoint is not step {committed}: {context}"
        )
        if point == "during a save":
            assert _leftovers(run), f"the kill did not interrupt a commit: {context}"
        assert not out.exists(), f"a killed run wrote its final state: {context}"

    final = run_script(run, out)
    context = f"kill seed {seed}; kills: {history}\n{final.text()}"
    assert final.rc == 0, f"the resumed run did not finish: {context}"
    assert final.resumed == committed, context
    assert not _leftovers(run), "the interrupted commit's files were not cleaned up"
    assert_same_run(expected, load_final(out), context)


def _newest_step(run: Path) -> int:
    """The step a resume would start from (newest valid checkpoint), 0 for none."""
    with CheckpointManager(str(run), readonly=True) as mgr:
        latest = mgr.latest()
    return latest.step if latest is not None else 0


def _leftovers(run: Path) -> list[str]:
    return [p for p in os.listdir(run) if p.startswith(".tmp-")]
