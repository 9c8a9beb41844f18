"""Kill-and-resume trials: start a worker on a run, SIGKILL it inside a chosen phase,
check the run, start the next one; at the end of a chain, finish the run and compare.

A *chain* is one run on one storage: up to ``chain_kills`` trials, each a worker process
killed once, then one worker that trains to the end, whose final state must digest to
exactly what an uninterrupted run of the same seed produced. After every trial:

- every checkpoint the run lists verifies (sizes and sha256 of every file) and the
  newest is at least as new as the newest any worker reported committed;
- every checkpoint reported committed is still there unless a worker announced deleting
  it, and a deletion is allowed by the retention rule (``keep_last`` newer ones exist);
- every restore returned exactly the state saved at that step (digests), never an older
  step than the newest committed, and no worker started fresh on a run with checkpoints.

Workers are forked from a forkserver that has imported torch and ckptkit once, so a
trial costs a fork and a few saves instead of an interpreter start; each is still its own
process, killed with SIGKILL and reaped before the next one takes the run lock.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.soak import worker

PHASES = worker.PHASES
ELSEWHERE = "elsewhere"  # training, start-up before the manager, closing
TARGETS = (*PHASES, "random")
WORKER_TIMEOUT = 120.0  # a worker that long is hung (loaded 2-core machine included)

STEPS, SAVE_EVERY, KEEP_LAST = 40, 2, 2


# -- storages ----------------------------------------------------------------------
@dataclass
class Backend:
    """Where a chain's run lives: the URL workers use, the place the checks read (for
    Drive the mount itself, so that checking never replays a dead worker's uploads) and
    the environment workers need."""

    kind: str
    root: str
    env: dict[str, str] = field(default_factory=dict)
    bucket: str = ""

    def url(self, run: str) -> str:
        if self.kind == "drive":
            return f"drive://soak/{run}"
        if self.kind == "gs":
            return f"gs://{self.bucket}/{run}"
        return os.path.join(self.root, run)

    def check_url(self, run: str) -> str:
        if self.kind == "drive":
            return os.path.join(self.env["CKPTKIT_DRIVE_ROOT"], "soak", run)
        return self.url(run)


def make_backend(kind: str, root: str, emulator: Any = None) -> Backend:
    env = {"CKPTKIT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    base = os.path.join(root, kind)
    os.makedirs(base, exist_ok=True)
    if kind == "drive":
        drive_root = os.path.join(base, "MyDrive")
        os.makedirs(drive_root, exist_ok=True)
        env["CKPTKIT_DRIVE_ROOT"] = drive_root
        env["CKPTKIT_DRIVE_STAGING"] = os.path.join(base, "staging")
    if kind == "gs":
        env["STORAGE_EMULATOR_HOST"] = emulator.host
        env["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
        return Backend(
            kind, base, env, bucket=emulator.create_bucket(f"soak-{uuid.uuid4().hex[:8]}")
        )
    return Backend(kind, base, env)


# -- one worker process ------------------------------------------------------------
@dataclass
class Life:
    """What one worker process did: every message, how it ended, where it was killed."""

    messages: list[tuple[Any, ...]] = field(default_factory=list)
    killed: bool = False
    landed: str | None = None  # the phase the kill landed in
    exitcode: int | None = None
    hung: bool = False
    seconds: float = 0.0

    def error(self) -> str | None:
        for msg in self.messages:
            if msg[0] == "error":
                return f"{msg[1]}: {msg[2]}"
        return None

    def done(self) -> tuple[str, dict[str, int]] | None:
        for msg in self.messages:
            if msg[0] == "done":
                return msg[1], msg[2]
        return None


_ctx: Any = None
_ctx_lock = threading.Lock()
_preload_gcs = False


def prepare(*, gcs: bool) -> None:
    """Say, before the first worker starts, whether workers will use ``gs://`` (then the
    forkserver imports gcsfs once, instead of every worker importing it)."""
    global _preload_gcs
    _preload_gcs = gcs


def context() -> Any:
    global _ctx
    with _ctx_lock:
        if _ctx is None:
            # gcsfs reads this when imported (in the forkserver, when preloaded).
            os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
            os.environ["CKPTKIT_DISABLE_PLUGIN_AUTOLOAD"] = "1"
            _ctx = multiprocessing.get_context("forkserver")
            preload = ["torch", "torch._dynamo", "safetensors.torch", "ckptkit.manager"]
            preload += ["ckptkit.storage.drive", "bench.soak.worker"]
            if _preload_gcs:
                preload += ["gcsfs", "ckptkit.storage.fsspec_backend"]
            _ctx.set_forkserver_preload(preload)
        return _ctx


Decide = Callable[[tuple[Any, ...], Any], str | None]


def live(
    cfg: dict[str, Any], *, decide: Decide | None = None, kill_after: float | None = None
) -> Life:
    """Run one worker until it exits or is killed. ``decide(msg, conn)`` sees every
    message and returns ``"kill"`` to SIGKILL the worker now; ``kill_after`` seconds
    kills it whatever it is doing (a kill at a random instant)."""
    ctx = context()
    ours, theirs = ctx.Pipe(duplex=True)
    proc = ctx.Process(target=worker.main, args=(cfg, theirs), daemon=True)
    started = time.monotonic()
    proc.start()
    theirs.close()
    life = Life()
    deadline = started + WORKER_TIMEOUT

    def kill() -> None:
        if not life.killed:
            life.killed = True
            with contextlib.suppress(ProcessLookupError):  # it may have just exited
                os.kill(proc.pid, signal.SIGKILL)

    while True:
        now = time.monotonic()
        if kill_after is not None and not life.killed and now - started >= kill_after:
            kill()
        if now > deadline and not life.killed:
            life.hung = True
            kill()
        wait = 0.05 if kill_after is None else max(0.0, min(0.05, started + kill_after - now))
        try:
            ready = ours.poll(wait)
            msg = ours.recv() if ready else None
        except (EOFError, OSError):
            break
        if msg is None:
            if not proc.is_alive() and not ours.poll(0):
                break
            continue
        life.messages.append(msg)
        if decide is not None and not life.killed and decide(msg, ours) == "kill":
            kill()
    proc.join()
    ours.close()
    life.exitcode = proc.exitcode
    life.seconds = time.monotonic() - started
    if life.killed and not life.hung and life.done() is None:
        life.landed = landed_phase(life.messages)
    return life


def landed_phase(messages: list[tuple[Any, ...]]) -> str:
    """The phase a killed worker was in: that of a point where it held, else the last
    phase it reported and did not report leaving."""
    for msg in reversed(messages):
        if msg[0] == "point" and msg[3] == "hold":
            return str(msg[1])
    for msg in reversed(messages):
        if msg[0] == "point":
            return str(msg[1])
        if msg[0] == "phase":
            return str(msg[1]) if msg[1] in PHASES else ELSEWHERE
    return ELSEWHERE


# -- the checks --------------------------------------------------------------------
@dataclass
class Ledger:
    """What the workers of one chain reported, across processes."""

    keep_last: int
    committed: dict[str, int] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    saved: dict[int, str] = field(default_factory=dict)  # step -> digest of its state

    def newest(self) -> int:
        return max(self.committed.values(), default=-1)

    def absorb(self, life: Life) -> list[str]:
        """Fold one worker's reports in; return what they show went wrong."""
        problems: list[str] = []
        before = self.newest()
        saving = -1
        for msg in life.messages:
            kind = msg[0]
            if kind == "saving":
                saving = int(msg[1])
                known = self.saved.setdefault(saving, msg[2])
                if known != msg[2]:
                    problems.append(f"step {saving} was saved with two different states")
            elif kind == "committed":
                self.committed[str(msg[1])] = int(msg[2])
            elif kind == "deleting":
                name, step = str(msg[1]), int(msg[2])
                newer = {s for s in self.committed.values() if s > step} | {saving}
                if len({s for s in newer if s > step}) < self.keep_last:
                    problems.append(f"rotation deleted {name} though keep_last={self.keep_last}")
                self.deleted.add(name)
            elif kind == "restored":
                name, step, dig = str(msg[1]), int(msg[2]), msg[3]
                self.committed[name] = step
                if step < before:
                    problems.append(f"restored step {step} though step {before} was committed")
                if self.saved.get(step) != dig:
                    problems.append(f"restored {name} with a state that was never saved there")
            elif kind == "fresh" and before >= 0:
                problems.append(f"started fresh though step {before} was committed")
        return problems


def check_run(url: str, ledger: Ledger) -> list[str]:
    """The invariants a reader sees after a kill (read only: nothing is repaired)."""
    from ckptkit import CheckpointManager, CkptError, read_checkpoint

    problems: list[str] = []
    # Warnings about skipped checkpoints are not silenced here (catch_warnings is not
    # thread-safe and chains run in threads): the runner filters them once.
    try:
        with CheckpointManager(url, readonly=True) as mgr:
            infos = mgr.list()
            latest = mgr.latest()
    except CkptError as exc:
        return [f"cannot read the run: {exc}"]
    for info in infos:
        try:
            read_checkpoint(info.url, verify=True)
        except CkptError as exc:
            problems.append(f"committed checkpoint {info.name} does not verify: {exc}")
    names = {i.name for i in infos}
    if ledger.committed and (latest is None or latest.step < ledger.newest()):
        got = "none" if latest is None else f"step {latest.step}"
        problems.append(f"latest is {got}, though step {ledger.newest()} was committed")
    lost = sorted(set(ledger.committed) - ledger.deleted - names)
    if lost:
        problems.append(f"committed and not rotated, yet gone: {', '.join(lost)}")
    # What readers see is committed, whether or not its worker lived to report it.
    ledger.committed.update({i.name: i.step for i in infos})
    return problems


# -- chains ------------------------------------------------------------------------
@dataclass
class Trial:
    storage: str
    kind: str  # "kill", "emulator" or "final"
    target: str
    mode: str
    landed: str | None
    problems: list[str]
    seconds: float
    note: str = ""
    trace: list[str] = field(default_factory=list)  # what the workers said, when it failed


def _trace(trial: Trial, life: Life, before: Life | None) -> None:
    """Keep, for a failed trial, the end of what this worker and the one before it said
    (the points show where a hung worker stopped)."""
    if not trial.problems:
        return
    for label, who, n in (("previous", before, 15), ("this", life, 40)):
        if who is not None:
            trial.trace += [
                f"{label}: {' '.join(map(str, m[:4]))}"[:160] for m in who.messages[-n:]
            ]
            trial.trace.append(f"{label}: exit {who.exitcode}, killed {who.killed}")


@dataclass
class Reference:
    digest: str
    counts: dict[str, int]
    seconds: float

    def nth_range(self, phase: str) -> int:
        """How many points of ``phase`` two occurrences of it have (a kill target is
        drawn among them); a restore has a variable number, and clamps."""
        saves = STEPS // SAVE_EVERY
        occurrences = {"save": saves, "commit": saves, "rotation": max(1, saves - KEEP_LAST)}
        if phase == "restore":
            return max(12, self.counts.get("restore", 0))
        per = self.counts.get(phase, 0) / occurrences[phase]
        return max(1, round(2 * per))


def base_cfg(backend: Backend, run: str, seed: int) -> dict[str, Any]:
    return {
        "url": backend.url(run),
        "seed": seed,
        "steps": STEPS,
        "save_every": SAVE_EVERY,
        "keep_last": KEEP_LAST,
        "env": backend.env,
    }


def reference(backend: Backend, seed: int, *, warm_up: bool = False) -> Reference:
    """One uninterrupted run on ``backend``: the final digest every chain must reach.
    ``warm_up`` runs it once before (which starts the forkserver), so the timed one is
    what a trial costs."""
    if warm_up:
        live(base_cfg(backend, f"warm-up-{uuid.uuid4().hex[:6]}", seed))
    life = live(base_cfg(backend, f"reference-{uuid.uuid4().hex[:6]}", seed))
    done = life.done()
    if done is None or life.exitcode != 0:
        raise RuntimeError(
            f"the uninterrupted run on {backend.kind} failed: {life.error() or life.exitcode}"
        )
    return Reference(done[0], done[1], life.seconds)


class Planner:
    """Draws kill targets: phases in shuffled rounds (so each gets its share), the first
    kill aimed at each phase on a storage held exactly there, later ones half of the time
    released a few milliseconds before the kill."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.queue: list[str] = []
        self.aimed: Counter[str] = Counter()

    def next(self, ref: Reference) -> dict[str, Any]:
        if not self.queue:
            self.queue = list(TARGETS)
            self.rng.shuffle(self.queue)
        target = self.queue.pop()
        self.aimed[target] += 1
        if target == "random":
            # A resumed worker lives shorter than a whole run: aim within its first half.
            after = self.rng.uniform(0, ref.seconds / 2)
            return {"phase": None, "mode": "random", "after": after}
        mode = "hold" if self.aimed[target] == 1 or self.rng.random() < 0.5 else "now"
        return {"phase": target, "nth": self.rng.randint(1, ref.nth_range(target)), "mode": mode}


def run_chain(
    backend: Backend,
    run: str,
    trials: int,
    ref: Reference,
    planner: Planner,
    rng: random.Random,
    seed: int,
    emulator: Any = None,
    emulator_trials: int = 0,
    async_save: bool = False,
) -> list[Trial]:
    """Up to ``trials`` killed workers on a fresh run, then one that finishes it (each
    saving with ``async_save`` when asked)."""
    ledger = Ledger(KEEP_LAST)
    out: list[Trial] = []
    cfg = {**base_cfg(backend, run, seed), "async_save": async_save}
    if async_save:  # half of the async chains take the rolling copy (where it applies)
        cfg["async_snapshot"] = "rolling" if rng.random() < 0.5 else "deferred"
    emulator_left = emulator_trials
    before: Life | None = None
    for _ in range(trials):
        if emulator_left and (emulator_left >= trials - len(out) or rng.random() < 0.5):
            emulator_left -= 1
            trial, life = _emulator_trial(cfg, ref, rng, emulator, backend)
        else:
            trial, life = _kill_trial(cfg, ref, planner, rng, backend.kind)
        trial.problems += ledger.absorb(life)
        trial.problems += check_run(backend.check_url(run), ledger)
        _trace(trial, life, before)
        before = life
        out.append(trial)
        if life.done() is not None:  # the plan never fired: this worker finished the run
            _check_final(trial, life, ref)
            return out
    start = time.monotonic()
    life = live(cfg)
    final = Trial(backend.kind, "final", "-", "-", None, [], 0.0)
    final.problems += ledger.absorb(life)
    _check_final(final, life, ref)
    final.problems += check_run(backend.check_url(run), ledger)
    _trace(final, life, before)
    final.seconds = time.monotonic() - start
    out.append(final)
    return out


def _check_final(trial: Trial, life: Life, ref: Reference) -> None:
    done = life.done()
    if done is None:
        trial.problems.append(f"the run did not finish: {life.error() or life.exitcode}")
    elif done[0] != ref.digest:
        trial.problems.append("final state differs from the uninterrupted run")
    trial.note = "finished" if done is not None else trial.note


def _kill_trial(
    cfg: dict[str, Any],
    ref: Reference,
    planner: Planner,
    rng: random.Random,
    storage: str,
) -> tuple[Trial, Life]:
    plan = planner.next(ref)
    if plan["mode"] == "random":
        life = live({**cfg, "kill": None}, kill_after=plan["after"])
        target = "random"
    else:
        delay = rng.uniform(0.0, 0.004)

        def decide(msg: tuple[Any, ...], conn: Any) -> str | None:
            if msg[0] != "point" or msg[3] is None:
                return None
            if msg[3] == "now":
                time.sleep(delay)  # the worker runs on into (or past) its storage call
            return "kill"

        life = live({**cfg, "kill": plan}, decide=decide)
        target = plan["phase"]
    trial = Trial(storage, "kill", target, plan["mode"], life.landed, [], life.seconds)
    if life.hung:
        trial.problems.append(f"the worker hung for {WORKER_TIMEOUT:.0f} s")
    elif not life.killed and life.done() is None:
        trial.problems.append(f"the worker failed before the kill: {life.error() or life.exitcode}")
    return trial, life


def _emulator_trial(
    cfg: dict[str, Any], ref: Reference, rng: random.Random, emulator: Any, backend: Backend
) -> tuple[Trial, Life]:
    """Kill the GCS emulator while the worker uploads, restart it, let the worker go on
    (its retries may carry it through, or the save raises), then SIGKILL the worker."""
    phase = rng.choice(("save", "commit"))
    plan = {"phase": phase, "nth": rng.randint(1, ref.nth_range(phase)), "mode": "emulator"}
    state: dict[str, Any] = {"down": False, "commits_after": 0, "timer": None}
    downtime = rng.uniform(0.2, 1.5)

    def decide(msg: tuple[Any, ...], conn: Any) -> str | None:
        if msg[0] == "point" and msg[3] == "emulator":
            emulator.kill()
            conn.send("go")
            state["down"] = True
            state["timer"] = threading.Timer(downtime, emulator.start)
            state["timer"].start()
            return None
        if state["down"] and msg[0] == "committed":
            state["commits_after"] += 1
            if state["commits_after"] >= 1:
                return "kill"
        return None

    life = live({**cfg, "kill": plan}, decide=decide)
    if state["timer"] is not None:
        state["timer"].join()
    if emulator.proc is None or emulator.proc.poll() is not None:
        emulator.start()
    deadline = time.monotonic() + 30
    while not _answers(emulator) and time.monotonic() < deadline:
        time.sleep(0.1)
    trial = Trial(backend.kind, "emulator", phase, "emulator", life.landed, [], life.seconds)
    err = life.error()
    if not state["down"]:
        trial.note = "the upload was not reached"
    elif err is not None:
        trial.note = "the save raised"
        if not err.startswith("StorageError"):
            trial.problems.append(f"the dead endpoint raised {err} instead of a StorageError")
    else:
        trial.note = "recovered by retrying" if state["commits_after"] else "no commit after"
    if life.hung:
        trial.problems.append(f"the worker hung for {WORKER_TIMEOUT:.0f} s")
    return trial, life


def _answers(emulator: Any) -> bool:
    import urllib.request

    try:
        urllib.request.urlopen(f"{emulator.host}/storage/v1/b?project=test", timeout=1).close()
        return True
    except OSError:
        return False
