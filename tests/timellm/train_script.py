"""What the Time-LLM trainer tests share: the tiny run, helpers to compare runs, and a fork
server that starts ``ckptkit train`` processes cheaply.

    python -m tests.timellm.train_script serve

Importing torch, transformers and timellm costs about 10 CPU-seconds per process on a
2-core machine, and the kill/resume tests need several processes in a row. The server
imports everything once, then forks one child per request. Each child is a process of its
own (its own session, signal handlers and exit status) that runs ``ckptkit.cli.main``, the
console script's entry point, with plugin autoload on: ``train`` comes from the
``ckptkit_timellm`` entry point, as for a user. Protocol, one line each way:
``RUN [log, argv]`` -> pid; ``POLL pid`` -> its exit code, or "alive".
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, NoReturn

import click
import torch

import ckptkit
from ckptkit.hooks.manager import AUTOLOAD_ENV, get_plugin_manager, reset_plugin_manager
from timellm import TimeLLMConfig, get_preset
from timellm.train import RunOptions, train

ROOT = Path(__file__).resolve().parents[2]
CKPTKIT = shutil.which("ckptkit", path=os.path.dirname(sys.executable))
# A hung process ends instead of the suite (generous: a loaded 2-core machine).
PROCESS_TIMEOUT = 150.0
TIMING_FIELDS = ("samples_per_s",)

# The tiny run: 12 steps, a checkpoint and a validation every 4, a loss record every 3
# (so records and checkpoints fall on different steps), one training epoch.
TINY = {"seq_len": 32, "label_len": 16, "pred_len": 8, "batch_size": 4, "max_steps": 12}
TINY_RUN = {"save_steps": 4, "eval_batches": 2, "log_every": 3, "progress": False}
# The same run through `ckptkit train`.
CLI_ARGS = [
    "--preset", "tiny-cpu", "--seq-len", "32", "--label-len", "16", "--pred-len", "8",
    "--batch-size", "4", "--max-steps", "12", "--save-steps", "4", "--eval-batches", "2",
    "--log-every", "3", "--no-progress",
]  # fmt: skip


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread while inside: on a loaded 2-core machine two OpenMP threads that
    spin-wait for each other make the tiny run 3x slower (and its time erratic)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_config(**overrides: Any) -> TimeLLMConfig:
    return get_preset("tiny-cpu", **{**TINY, **overrides})


def tiny_options(output: Path | str, **overrides: Any) -> RunOptions:
    return RunOptions(output=str(output), **{**TINY_RUN, **overrides})


def quiet(_: str) -> None:
    """An ``echo`` for in-process runs (pytest shows nothing of them anyway)."""


_finished: dict[str, Path] = {}


def finished_run(root: Path) -> Path:
    """One uninterrupted tiny run, trained in this process once per session; copy it
    (:func:`copy_run`) before changing it."""
    if "tiny" not in _finished:
        run = root / "finished-tiny"
        summary = train(tiny_config(), tiny_options(run), echo=quiet)
        assert summary["exit_code"] == 0 and summary["step"] == 12, summary
        _finished["tiny"] = run
    return _finished["tiny"]


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def trainable(url: Path | str) -> dict[str, torch.Tensor]:
    """The trainable weights of a checkpoint, or of a run's latest checkpoint."""
    model = ckptkit.load(str(url))["model"]
    # ckptkit.TrainableOnly's layout, or the flat one the trainer wrote before it.
    return model["tensors"] if "format" in model else model


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"weights differ from the uninterrupted run: {differ[:5]}"


def records(run: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without its wall-clock fields."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS} for line in lines]


def steps(run: Path) -> list[int]:
    """Steps of the run's committed checkpoints, oldest first."""
    with ckptkit.CheckpointManager(str(run), readonly=True) as mgr:
        return [c.step for c in mgr.list()]


@contextmanager
def timellm_cli() -> Iterator[click.Group]:
    """The ``ckptkit`` group with the Time-LLM plugin registered on a fresh plugin manager
    (tests run without entry-point autoload); the previous commands come back after."""
    import ckptkit_timellm.plugin

    from ckptkit.cli import _register_commands, cli

    before = dict(cli.commands)
    reset_plugin_manager()
    get_plugin_manager().register(ckptkit_timellm.plugin, name="timellm")
    try:
        _register_commands()
        yield cli
    finally:
        cli.commands.clear()
        cli.commands.update(before)
        reset_plugin_manager()


def assert_one_line_error(code: int, stderr: str, expected: int, *words: str) -> None:
    """Exit ``expected``; stderr is one ``Error:`` line naming ``words``; no traceback."""
    lines = stderr.strip().splitlines()
    assert code == expected, (code, stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


# -- real processes -----------------------------------------------------------


def cli_env() -> dict[str, str]:
    """This environment with entry-point autoload on, as a user's shell has it (and torch on
    one thread, see :func:`one_thread`)."""
    env = {k: v for k, v in os.environ.items() if k != AUTOLOAD_ENV}
    return {**env, "OMP_NUM_THREADS": "1"}


def console_script(log: Path, *argv: str) -> subprocess.Popen[bytes]:
    """``ckptkit ARGV`` as installed, in its own session, output to ``log``."""
    assert CKPTKIT, "the ckptkit console script is not installed in this environment"
    with open(log, "wb") as sink:
        return subprocess.Popen(
            [CKPTKIT, *argv],
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=cli_env(),
            cwd=ROOT,
            start_new_session=True,
        )


def wait_until(done: Callable[[], bool], what: str, timeout: float = PROCESS_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class ForkServer:
    """Client of ``serve()`` (see the module docstring)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.timellm.train_script", "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=cli_env(),
            cwd=ROOT,
        )

    def _ask(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().strip()
        assert reply, f"the fork server died answering {line!r}"
        return reply

    def start(self, log: Path, *argv: str) -> int:
        """Start ``ckptkit ARGV`` in a forked child; returns its pid."""
        return int(self._ask("RUN " + json.dumps([str(log), list(argv)])))

    def exit_code(self, pid: int) -> int | None:
        reply = self._ask(f"POLL {pid}")
        return None if reply == "alive" else int(reply)

    def wait(self, pid: int, timeout: float = PROCESS_TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while (code := self.exit_code(pid)) is None:
            if time.monotonic() > deadline:
                signal_group(pid, signal.SIGKILL)  # a hung child ends, not the suite
                raise AssertionError(f"process {pid} still running after {timeout:.0f} s")
            time.sleep(0.05)
        return code

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


_server: ForkServer | None = None


def fork_server() -> ForkServer:
    """The session's fork server (started on first use, stopped at exit)."""
    global _server
    if _server is None:
        _server = ForkServer()
        atexit.register(_server.close)
    return _server


def signal_group(pid: int, sig: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def serve() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import ckptkit_timellm.commands  # noqa: F401 - the imports every child would pay for
    import matplotlib.pyplot  # noqa: F401

    import ckptkit.cli  # noqa: F401
    import timellm.predict  # noqa: F401

    started: list[int] = []
    done: dict[int, int] = {}
    for line in sys.stdin:
        verb, _, arg = line.strip().partition(" ")
        if verb == "RUN":
            log, argv = json.loads(arg)
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                _child(log, argv)
            started.append(pid)
            print(pid, flush=True)
            continue
        pid = int(arg)
        if pid not in done:
            got, status = os.waitpid(pid, os.WNOHANG)
            if got:
                done[pid] = os.waitstatus_to_exitcode(status)
        print(done.get(pid, "alive"), flush=True)
    for pid in started:  # the client is gone: so are the children it left running
        if pid not in done:
            signal_group(pid, signal.SIGKILL)
    os._exit(0)  # skip the interpreter's teardown of torch & co (seconds)


def _child(log: str, argv: list[str]) -> NoReturn:
    code = 1
    try:
        os.setsid()  # its own process group: a test signals it like a job scheduler would
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        from ckptkit.cli import main

        reset_plugin_manager()  # built in this process, with entry-point autoload
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    if sys.argv[1:] != ["serve"]:
        sys.exit("usage: python -m tests.timellm.train_script serve")
    serve()
