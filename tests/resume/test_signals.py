"""Signals and time limits: finish the step in progress, save at it, exit 75; the same
command then resumes at exactly that step and ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import ckptkit
from ckptkit import EXIT_RESUMABLE
from tests.resume import (
    Outcome,
    assert_same_run,
    first_difference,
    load_final,
    reference,
    run_python,
    run_script,
    run_to_completion,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PLAIN_LOOP = Path(__file__).parents[2] / "examples" / "plain_loop.py"


def at(marker: str, nth: int = 1) -> tuple[list[str], Callable[[str], bool]]:
    """``--hold`` arguments that pause the process after its ``nth`` ``marker`` line, and
    a predicate that recognises that line (the moment to send a signal)."""
    seen = 0

    def held(line: str) -> bool:
        nonlocal seen
        seen += line.split(" ", 1)[0] == marker
        return seen == nth

    return ["--hold", f"{marker}:{nth}"], held


def held_step(outcome: Outcome, marker: str, nth: int) -> int:
    """The step number on the line the process was paused after."""
    return outcome.steps(marker)[nth - 1]


def assert_stopped_resumable(outcome: Outcome, step: int) -> None:
    """Exit 75 right after committing ``step``, with no step after it."""
    assert outcome.rc == EXIT_RESUMABLE, outcome.text()
    assert outcome.last("SAVED") == step, f"expected a save at step {step}:\n{outcome.text()}"
    assert outcome.last("STEP") == step, f"steps ran past the save:\n{outcome.text()}"
    assert outcome.values("EXIT")[-1].split()[0] == str(EXIT_RESUMABLE), outcome.text()
    assert "DONE" not in outcome.lines


def resume_and_compare(
    run: Path, out: Path, expected: dict[str, Any], saved: int, *args: str
) -> None:
    """Rerun the same command until done: it resumes at ``saved`` and ends as ``expected``."""
    pieces = run_to_completion(run, out, *args)
    assert pieces[0].resumed == saved, pieces[0].text()
    assert_same_run(expected, load_final(out), pieces[-1].text())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_between_micro_batches_finishes_the_step_then_saves_and_exits_75(
    sig: int, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Paused after the first micro-batch of a step: gradients are accumulated, the
    # optimizer step is not taken. The signal must not cut that step short.
    expected = reference(tmp_path_factory.getbasetemp())
    run, out = tmp_path / "run", tmp_path / "final.pt"
    hold, held = at("MICRO", 5)
    stopped = run_script(run, out, *hold, stops=[(held, sig)], whole_group=False)
    step = held_step(stopped, "MICRO", 5)
    assert_stopped_resumable(stopped, step)
    resume_and_compare(run, out, expected, step)


def test_sigterm_during_a_save_stops_right_after_that_save(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # The checkpoint being written is of the step just finished: once it is committed
    # there is nothing left to do, so no further step may run.
    expected = reference(tmp_path_factory.getbasetemp())
    run, out = tmp_path / "run", tmp_path / "final.pt"
    hold, held = at("SAVING", 2)  # inside the first commit, at step 4
    stopped = run_script(run, out, *hold, stops=[(held, signal.SIGTERM)], whole_group=False)
    assert_stopped_resumable(stopped, 4)
    resume_and_compare(run, out, expected, 4)


def test_sigusr1_during_validation_saves_at_the_epoch_end(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # The per-epoch StepLR variant: the scheduler steps after validation, so a resume
    # that repeated or skipped the epoch end would show in the learning rates.
    args = ("--schedule", "epoch")
    expected = reference(tmp_path_factory.getbasetemp(), *args)
    run, out = tmp_path / "run", tmp_path / "final.pt"
    hold, held = at("VALIDATING", 2)
    stopped = run_script(run, out, *args, *hold, stops=[(held, signal.SIGUSR1)], whole_group=False)
    step = max(stopped.steps("STEP"))
    assert_stopped_resumable(stopped, step)
    resume_and_compare(run, out, expected, step, *args)


def test_time_limit_saves_and_exits_75_before_the_limit_until_the_run_is_done(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    limit = 2.0
    expected = reference(tmp_path_factory.getbasetemp())
    run, out = tmp_path / "run", tmp_path / "final.pt"
    # 0.1 s per step makes the whole run longer than the limit: it needs several pieces.
    pieces = run_to_completion(run, out, "--time-limit", f"{limit}s", "--step-sleep", "0.1")
    assert len(pieces) >= 2, "the time limit never stopped the run"
    for piece, following in zip(pieces, pieces[1:], strict=False):
        assert piece.rc == EXIT_RESUMABLE, piece.text()
        saved = piece.last("SAVED")
        assert_stopped_resumable(piece, saved)
        assert following.resumed == saved, following.text()
        # Ordering, not performance: the process left before its limit (plus scheduling
        # slack on a loaded machine), having measured its steps and saves as it went.
        seconds = float(piece.values("EXIT")[-1].split()[1])
        assert seconds < limit + 1.0, f"exited {seconds:.2f} s after start:\n{piece.text()}"
    assert_same_run(expected, load_final(out), pieces[-1].text())


@pytest.mark.parametrize("between", [(), (signal.SIGTERM,)], ids=["alone", "after-SIGTERM"])
def test_sigint_again_while_saving_interrupts_at_once_and_the_run_still_resumes(
    between: tuple[int, ...], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Ctrl+C asks for a save; Ctrl+C again while that save is being written interrupts at
    # once (KeyboardInterrupt), also when a wrapper passed the first one on as SIGTERM.
    # The half-written checkpoint must stay invisible.
    expected = reference(tmp_path_factory.getbasetemp())
    run, out = tmp_path / "run", tmp_path / "final.pt"
    first, at_step = at("STEP", 6)
    # Steps 4 and 6 are saved: the second file the step-6 commit writes is file number
    # (files per commit + 2), counted on a checkpoint of the reference run (manifest included).
    done = next(tmp_path_factory.getbasetemp().glob("reference-*/step-*"))
    per_commit = len(os.listdir(done))
    second, in_save = at("SAVING", per_commit + 2)
    stops = [(at_step, signal.SIGINT)]
    stops += [(at("STEP", 6)[1], sig) for sig in between]
    stops += [(in_save, signal.SIGINT)]
    interrupted = run_script(run, out, *first, *second, stops=stops, whole_group=False)
    assert interrupted.rc not in (0, EXIT_RESUMABLE), interrupted.text()
    assert any("KeyboardInterrupt" in line for line in interrupted.lines), interrupted.text()
    assert interrupted.values("SAVING")[per_commit + 1].startswith(".tmp-step-000000000006"), (
        interrupted.text()
    )
    assert interrupted.last("SAVED") == 4, "the interrupted save became visible"
    resume_and_compare(run, out, expected, 4)


def test_sigterm_to_the_whole_job_including_data_workers(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # SLURM's time limit, scancel and preemption signal every process of the job, and so
    # does `kill -TERM -PGID`: the DataLoader workers get the SIGTERM too.
    expected = reference(tmp_path_factory.getbasetemp())
    run, out = tmp_path / "run", tmp_path / "final.pt"
    hold, held = at("STEP", 3)
    stopped = run_script(run, out, *hold, stops=[(held, signal.SIGTERM)], whole_group=True)
    assert_stopped_resumable(stopped, 3)
    resume_and_compare(run, out, expected, 3)


def test_the_plain_loop_example_stops_on_sigterm_and_resumes_to_the_same_state(
    tmp_path: Path,
) -> None:
    args = ("--epochs", "2", "--save-every", "25")

    def plain_loop(run: str, **how: Any) -> Outcome:
        return run_python(PLAIN_LOOP, "--run", run, *args, log_dir=tmp_path, **how)

    whole, pieces = str(tmp_path / "whole"), str(tmp_path / "pieces")
    assert plain_loop(whole).rc == 0
    after_epoch_1 = (lambda line: line.startswith("epoch 1 "), signal.SIGTERM)
    stopped = plain_loop(pieces, stops=[after_epoch_1], whole_group=False)
    assert stopped.rc == EXIT_RESUMABLE, stopped.text()
    assert stopped.lines[-1].endswith("(SIGTERM)"), stopped.text()
    resumed = plain_loop(pieces)
    assert resumed.rc == 0, resumed.text()
    assert any(line.startswith("resumed at step") for line in resumed.lines), resumed.text()
    # The newest checkpoint of each run holds everything: model, optimizer, scheduler,
    # data position, RNGs, EarlyStopping, step and epoch. The example seeds only torch;
    # Python's and NumPy's global RNGs start from OS entropy in every fresh process.
    expected, got = ckptkit.load(whole), ckptkit.load(pieces)
    for state in (expected, got):
        del state["rng"]["python"], state["rng"]["numpy"]
    diff = first_difference(expected, got, "state")
    assert diff is None, f"final checkpoints differ at {diff}"
