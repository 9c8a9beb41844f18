"""Fault and hostile-input cases: one damaged or hostile thing each, through the public
API and the CLI, with the outcome ckptkit promises and the outcome it gave.

A case returns a :class:`Case`; ``PASS`` means the promise held, ``FAIL`` that it did not
(the observed column says how), ``SKIP`` that the case could not be set up here (the
reason is given). Cases that could hang (a FIFO, a dead endpoint) run in a subprocess
with a time limit. Nothing here repairs or hides a failure: a case that fails on this
commit is reported as failing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
MANIFEST = "manifest.json"
CLI = "import sys; from ckptkit.cli import main; main(sys.argv[1:])"


@dataclass
class Case:
    name: str
    item: str  # the item of issue 9 the promise comes from
    expected: str
    observed: str
    outcome: str
    seconds: float = 0.0


# -- helpers -----------------------------------------------------------------------
def _state(seed: int = 0, optimizer: str = "adamw") -> dict[str, Any]:
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt: Any = (
        torch.optim.AdamW(model.parameters(), lr=1e-2)
        if optimizer == "adamw"
        else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    )
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt, "step": 0}


def _saved_run(run: Path, steps: tuple[int, ...] = (1, 2, 3)) -> None:
    from ckptkit import CheckpointManager

    with CheckpointManager(str(run), keep_last=None) as mgr:
        for step in steps:
            state = _state(step)
            state["step"] = step
            mgr.save(step, state)


def _ckpt(run: Path, step: int) -> Path:
    return run / f"step-{step:012d}"


def _restored_step(run: Path) -> tuple[int | None, str]:
    """What a resume restores from ``run`` (read only), and any error's type."""
    from ckptkit import CheckpointManager, CkptError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with CheckpointManager(str(run), readonly=True) as mgr:
                return mgr.restore(_state(99)), ""
        except CkptError as exc:
            return None, f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - an uncaught error is the finding
            return None, f"uncaught {type(exc).__name__}: {exc}"


def _latest_step(run: Path) -> int | None:
    from ckptkit import CheckpointManager

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with CheckpointManager(str(run), readonly=True) as mgr:
            latest = mgr.latest()
    return None if latest is None else latest.step


def _rewrite_manifest(ckpt: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = ckpt / MANIFEST
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def _cli(*args: str) -> dict[str, Any]:
    """``ckptkit ARGS`` in this process (its real entry point, output captured): the exit
    code, what it printed, and whether an exception escaped it (a traceback)."""
    import io

    from ckptkit.cli import main

    out, err = io.StringIO(), io.StringIO()
    rc: Any = 0
    started = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except Exception as exc:  # noqa: BLE001 - escaping the CLI is the finding
            rc = 1
            err.write(f"Traceback (uncaught {type(exc).__name__}: {exc})\n")
    return {
        "rc": rc,
        "out": out.getvalue(),
        "err": err.getvalue(),
        "seconds": time.monotonic() - started,
    }


def _cli_process(*args: str, env: dict[str, str], timeout: float) -> dict[str, Any]:
    """``ckptkit ARGS`` as its own process (for what may hang or needs its own env)."""
    return _python(CLI, *args, env=env, timeout=timeout)


def _python(
    code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> dict[str, Any]:
    """Run ``python -c code args`` with this checkout first on the path; a hang is
    killed at ``timeout`` and reported as such."""
    root = str(Path(__file__).resolve().parents[2])
    full = {**os.environ, "CKPTKIT_DISABLE_PLUGIN_AUTOLOAD": "1", **(env or {})}
    full["PYTHONPATH"] = os.pathsep.join([root, full.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, *args],
            env=full,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"rc": None, "out": "", "err": "", "seconds": time.monotonic() - started}
    return {
        "rc": proc.returncode,
        "out": proc.stdout,
        "err": proc.stderr,
        "seconds": time.monotonic() - started,
    }


def _short(text: str, n: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


# -- the cases ---------------------------------------------------------------------
def symlinked_member(tmp: Path, quick: bool = False) -> Case:
    """A member replaced by a symlink to a file outside the run (here: a copy of the
    real member, so that size and sha256 match and only confinement can refuse it)."""
    expected = "step 3 refused (a symlink is not a checkpoint file): resume restores step 2"
    run = tmp / "run"
    _saved_run(run)
    secret = tmp / "secret" / "state.json"
    secret.parent.mkdir()
    member = _ckpt(run, 3) / "state.json"
    shutil.copyfile(member, secret)
    member.unlink()
    member.symlink_to(secret)
    step, err = _restored_step(run)
    ok = step == 2
    observed = f"resume restored step {step}" + (f" ({_short(err)})" if err else "")
    if step == 3:
        observed += ": the symlink was followed"
    return Case("symlinked member to a secret file", "2", expected, observed, PASS if ok else FAIL)


def symlinked_checkpoint_dir(tmp: Path, quick: bool = False) -> Case:
    expected = "a checkpoint directory that is a symlink is refused: resume restores step 2"
    run = tmp / "run"
    _saved_run(run, (1, 2))
    outside = tmp / "elsewhere"
    _saved_run(outside, (3,))
    os.symlink(_ckpt(outside, 3), _ckpt(run, 3))
    step, err = _restored_step(run)
    observed = f"resume restored step {step}" + (f" ({_short(err)})" if err else "")
    return Case(
        "symlinked checkpoint directory", "2", expected, observed, PASS if step == 2 else FAIL
    )


def fifo_member(tmp: Path, quick: bool = False) -> Case:
    """Both members replaced by FIFOs with no writer: an ``open`` that follows the path
    blocks forever. A watchdog opens them for writing after 3 s, so a blocked reader is
    released (and reported as having hung) instead of hanging the soak."""
    expected = "step 3 refused at once (a FIFO is not a regular file): resume restores step 2"
    run = tmp / "run"
    _saved_run(run)
    fifos = []
    for name in ("state.json", "model.safetensors"):
        member = _ckpt(run, 3) / name
        member.unlink()
        os.mkfifo(member)
        fifos.append(member)
    released: list[str] = []
    done = threading.Event()

    def watchdog() -> None:
        if done.wait(3.0):
            return
        for fifo in fifos:
            with contextlib.suppress(OSError):
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                os.close(fd)  # the blocked reader sees end-of-file
                released.append(fifo.name)

    threading.Thread(target=watchdog, daemon=True).start()
    started = time.monotonic()
    step, err = _restored_step(run)
    done.set()
    seconds = time.monotonic() - started
    observed = f"resume restored step {step} in {seconds:.1f} s" + (
        f" ({_short(err)})" if err else ""
    )
    if released:
        observed += f"; it blocked on {', '.join(released)} until the watchdog wrote to it"
    ok = step == 2 and not released
    return Case("FIFO member", "2", expected, observed, PASS if ok else FAIL)


def dotdot_names(tmp: Path, quick: bool = False) -> Case:
    """The manifest names ``../../secret/state.pt`` (with the right size and sha256)."""
    expected = "a manifest naming a path outside the checkpoint is corrupt: resume restores 2"
    run = tmp / "run"
    _saved_run(run)
    ckpt = _ckpt(run, 3)
    secret = tmp / "secret" / "state.json"
    secret.parent.mkdir()
    shutil.move(ckpt / "state.json", secret)
    outside = "../../secret/state.pt"

    def point_outside(raw: dict[str, Any]) -> None:
        raw["files"][outside] = raw["files"].pop("state.json")
        raw["entries"] = {k: outside if v == "state.json" else v for k, v in raw["entries"].items()}

    _rewrite_manifest(ckpt, point_outside)
    step, err = _restored_step(run)
    observed = f"resume restored step {step}" + (f" ({_short(err)})" if err else "")
    if step == 3:
        observed += f": read {outside}"
    return Case("'..' names in the manifest", "2", expected, observed, PASS if step == 2 else FAIL)


# Each makes step 3's manifest wrong in one field; every one must make step 3 corrupt.
_MALFORMED: dict[str, Callable[[dict[str, Any]], None]] = {
    "step true": lambda m: m.update(step=True),
    "step -5": lambda m: m.update(step=-5),
    "step '3'": lambda m: m.update(step="3"),
    "step 10**13": lambda m: m.update(step=10**13),
    "size '99'": lambda m: m["files"]["state.json"].update(
        size=str(m["files"]["state.json"]["size"])
    ),
    "size -1": lambda m: m["files"]["state.json"].update(size=-1),
    "xxh3 'zz'": lambda m: m["files"]["state.json"].update(xxh3="zz"),
    "metric NaN": lambda m: m.update(metrics={"loss": math.nan}),
    "entry names an unlisted file": lambda m: m["entries"].update(extra="other.pt"),
    "files not a dict": lambda m: m.update(files=[]),
}


def malformed_manifest(tmp: Path, quick: bool = False) -> Case:
    expected = (
        "each malformed field makes step 3 corrupt: latest and resume give step 2, "
        "`ckptkit ls` prints no traceback"
    )
    wrong: list[str] = []
    variants = {**_MALFORMED, "duplicate key": None}
    for i, (label, change) in enumerate(variants.items()):
        run = tmp / f"run-{i}"
        _saved_run(run)
        ckpt = _ckpt(run, 3)
        if change is None:  # duplicate JSON keys: the second "step" would win
            text = (ckpt / MANIFEST).read_text()
            (ckpt / MANIFEST).write_text(text.replace("{", '{"step": 7, ', 1))
        else:
            _rewrite_manifest(ckpt, change)
        step, err = _restored_step(run)
        try:
            latest = _latest_step(run)
        except Exception as exc:  # noqa: BLE001 - an uncaught error is the finding
            latest, err = None, f"latest() raised {type(exc).__name__}"
        if step != 2 or latest != 2:
            wrong.append(f"{label}: restored {step!r}, latest {latest!r}{' ' + err if err else ''}")
    for i in range(len(variants)):  # ls must still print its table, never a traceback
        got = _cli("ls", str(tmp / f"run-{i}"))
        if "Traceback" in got["err"]:
            wrong.append(f"ls printed a traceback ({list(variants)[i]})")
    observed = (
        f"all {len(variants)} refused"
        if not wrong
        else f"{len(wrong)} of {len(variants)} accepted: " + "; ".join(wrong)
    )
    return Case(
        "malformed manifest fields",
        "3",
        expected,
        _short(observed, 400),
        PASS if not wrong else FAIL,
    )


def truncated_file(tmp: Path, quick: bool = False) -> Case:
    run = tmp / "run"
    _saved_run(run)
    os.truncate(_ckpt(run, 3) / "model.safetensors", 10)
    step, err = _restored_step(run)
    latest = _latest_step(run)
    ok = step == 2 and latest == 2
    return Case(
        "truncated file",
        "-",
        "step 3 skipped with a warning: latest and resume give step 2",
        f"resume restored {step}, latest {latest}" + (f" ({_short(err)})" if err else ""),
        PASS if ok else FAIL,
    )


def flipped_byte(tmp: Path, quick: bool = False) -> Case:
    run = tmp / "run"
    _saved_run(run)
    path = _ckpt(run, 3) / "state.json"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    step, err = _restored_step(run)
    verify = _cli("verify", str(_ckpt(run, 3)))
    ok = step == 2 and verify["rc"] not in (0, None)
    observed = f"resume restored {step}; verify exited {verify['rc']}"
    return Case(
        "flipped byte",
        "-",
        "sha256 catches it: resume restores step 2, `ckptkit verify` fails",
        observed + (f" ({_short(err)})" if err else ""),
        PASS if ok else FAIL,
    )


def verify_exit_code(tmp: Path, quick: bool = False) -> Case:
    run = tmp / "run"
    _saved_run(run)
    os.truncate(_ckpt(run, 3) / "state.json", 10)
    got = _cli("verify", str(_ckpt(run, 3)))
    ok = got["rc"] == 4 and "Traceback" not in got["err"]
    return Case(
        "verify on a damaged checkpoint",
        "8",
        "`ckptkit verify` exits 4 (the documented code for a damaged checkpoint)",
        f"exited {got['rc']}",
        PASS if ok else FAIL,
    )


class _Evil:
    def __init__(self, canary: str) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.canary!r}, 'w').write('pwned')",))


def malicious_pickle(tmp: Path, quick: bool = False) -> Case:
    """state.pt replaced by a pickle that would create a canary file; the manifest is
    updated to match, so integrity checks pass and only safe loading can stop it."""
    import torch
    import xxhash

    expected = "nothing executes (no canary file): the load is refused as unsafe"
    run = tmp / "run"
    _saved_run(run)
    canary = tmp / "canary"
    ckpt = _ckpt(run, 3)
    path = ckpt / "state.json"
    torch.save({"step": 3, "optimizer": _Evil(str(canary))}, path)
    data = path.read_bytes()

    def match(raw: dict[str, Any]) -> None:
        raw["files"]["state.json"] = {"size": len(data), "xxh3": xxhash.xxh3_128_hexdigest(data)}

    _rewrite_manifest(ckpt, match)
    step, err = _restored_step(run)
    loads: list[str] = []
    from ckptkit import CkptError, load

    try:
        load(str(ckpt))
        loads.append("ckptkit.load accepted it")
    except CkptError as exc:
        loads.append(type(exc).__name__)
    inspect = _cli("inspect", str(ckpt))
    ok = not canary.exists() and step != 3 and "accepted" not in loads[0]
    observed = (
        f"canary {'CREATED' if canary.exists() else 'absent'}; resume restored {step}; "
        f"load: {loads[0]}; inspect exited {inspect['rc']}"
    )
    return Case("malicious pickle in state.pt", "-", expected, observed, PASS if ok else FAIL)


@contextlib.contextmanager
def _tmpfs(where: Path, size: str) -> Iterator[str | None]:
    """A small tmpfs at ``where`` (None and the reason when it cannot be mounted)."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        yield f"cannot run mount: {exc}"
        return
    if res.returncode != 0:
        yield f"cannot mount a tmpfs here ({_short(res.stderr.strip(), 80)})"
        return
    try:
        yield None
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def _fill(root: Path) -> None:
    """Fill the filesystem of ``root`` to the last byte."""
    with open(root / "filler", "wb", buffering=0) as f:  # unbuffered: close cannot fail
        for block in (65536, 1):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * block)


def full_disk(tmp: Path, quick: bool = False) -> Case:
    from ckptkit import CheckpointManager, StorageError, read_checkpoint

    expected = (
        "a new run on a full disk: StorageError, no empty .lock left; a save on a full "
        "disk: StorageError, earlier checkpoints intact"
    )
    mount = tmp / "small-disk"
    with _tmpfs(mount, "4m") as reason:
        if reason is not None:
            return Case("full disk", "6", expected, f"skipped: {reason}", SKIP)
        run = mount / "run"
        _saved_run(run, (1,))
        _fill(mount)
        wrong: list[str] = []
        try:
            with CheckpointManager(str(mount / "new-run")):
                wrong.append("opening a new run on a full disk succeeded")
        except StorageError:
            pass
        except Exception as exc:  # noqa: BLE001 - the raw OSError is the finding
            wrong.append(f"opening a new run raised {type(exc).__name__}, not StorageError")
        lock = mount / "new-run" / ".lock"
        if lock.exists() and lock.stat().st_size == 0:
            wrong.append("a 0-byte .lock was left behind")
        try:
            with CheckpointManager(str(run), keep_last=1) as mgr:
                mgr.save(2, _state(2))
            wrong.append("a save on a full disk succeeded")
        except StorageError:
            pass
        except Exception as exc:  # noqa: BLE001
            wrong.append(f"a save raised {type(exc).__name__}, not StorageError")
        try:
            read_checkpoint(str(_ckpt(run, 1)), verify=True)
        except Exception as exc:  # noqa: BLE001
            wrong.append(f"step 1 no longer verifies ({type(exc).__name__})")
    observed = "as expected" if not wrong else "; ".join(wrong)
    return Case("full disk", "6", expected, observed, PASS if not wrong else FAIL)


_DRIVE_VANISH = """
import os, shutil, sys, warnings
warnings.simplefilter("ignore")
import torch
from ckptkit import CheckpointManager, StorageError
root, how = sys.argv[1], sys.argv[2]
m = torch.nn.Linear(4, 3)
state = {"model": m, "step": 0}
try:
    with CheckpointManager("drive://soak/run", keep_last=2) as mgr:
        mgr.save(1, state)
        mgr.wait()
        shutil.move(root, root + "-unmounted")
        if how == "empty":
            os.mkdir(root)  # the mount point stays behind as an empty folder
        mgr.save(2, state)
        mgr.wait()
    print("no error", flush=True)
except StorageError as exc:
    print("StorageError", exc, flush=True)
"""


def vanished_drive(tmp: Path, quick: bool = False) -> Case:
    expected = (
        "a save after the Drive mount vanished raises StorageError from save/wait/close; "
        "nothing is written to a local copy of the mount point"
    )
    results: dict[str, dict[str, Any]] = {}

    def run(how: str) -> None:  # both variants at once: each may sit out Drive's retries
        base = tmp / how
        root = base / "MyDrive"
        root.mkdir(parents=True)
        env = {"CKPTKIT_DRIVE_ROOT": str(root), "CKPTKIT_DRIVE_STAGING": str(base / "staging")}
        results[how] = _python(_DRIVE_VANISH, str(root), how, env=env, timeout=120)

    # --quick: only the harder variant (the mount point left behind as an empty folder).
    variants = ("empty",) if quick else ("removed", "empty")
    threads = [threading.Thread(target=run, args=(how,)) for how in variants]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wrong: list[str] = []
    for how, got in results.items():
        if got["rc"] is None:
            wrong.append(f"mount {how}: hung for 120 s")
            continue
        if "StorageError" not in got["out"]:
            tail = got["out"].strip() or (got["err"].strip().splitlines() or ["?"])[-1]
            wrong.append(f"mount {how}: {_short(tail, 60)}")
        local = tmp / how / "MyDrive" / "soak" / "run"
        if local.exists():
            wrong.append(f"mount {how}: the run was written to a local {local.name}/ folder")
    seconds = max(got["seconds"] for got in results.values())
    observed = "as expected" if not wrong else "; ".join(wrong)
    return Case(
        "vanished Drive mount", "1", expected, observed, PASS if not wrong else FAIL, seconds
    )


def _silent_server() -> tuple[socket.socket, int]:
    """A socket that accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = srv.accept()
                held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    return srv, int(srv.getsockname()[1])


def dead_gcs(tmp: Path, quick: bool = False, *, limit: float = 60.0) -> Case:
    expected = (
        f"`ckptkit ls gs://...` on a refusing and on a silent endpoint: a one-line error "
        f"within {limit:.0f} s, no traceback"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refusing = int(s.getsockname()[1])
    silent, port = _silent_server()
    results: dict[str, dict[str, Any]] = {}

    def ls(label: str, host_port: int) -> None:
        env = {
            "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{host_port}",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }
        results[label] = _cli_process("ls", "gs://soak-bucket/run", env=env, timeout=limit + 30)

    threads = [
        threading.Thread(target=ls, args=("refusing", refusing)),
        threading.Thread(target=ls, args=("silent", port)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    silent.close()
    wrong: list[str] = []
    for label, got in results.items():
        if got["rc"] is None:
            wrong.append(f"{label}: no answer in {limit + 30:.0f} s")
        elif got["rc"] == 0:
            wrong.append(f"{label}: exited 0")
        elif got["seconds"] > limit:
            wrong.append(f"{label}: took {got['seconds']:.0f} s")
        if got["rc"] is not None and "Traceback" in got["err"]:
            wrong.append(f"{label}: printed a traceback")
    times = ", ".join(f"{k} {v['seconds']:.0f} s (exit {v['rc']})" for k, v in results.items())
    observed = times if not wrong else times + ": " + "; ".join(wrong)
    seconds = max(v["seconds"] for v in results.values())
    return Case("dead GCS endpoint", "5", expected, observed, PASS if not wrong else FAIL, seconds)


def mismatched_optimizer(tmp: Path, quick: bool = False) -> Case:
    import torch

    from ckptkit import CheckpointManager, IncompatibleCheckpointError

    expected = "restoring an AdamW checkpoint into SGD is refused and changes nothing"
    run = tmp / "run"
    _saved_run(run, (1,))
    state = _state(7, optimizer="sgd")
    before = {k: v.clone() for k, v in state["model"].state_dict().items()}
    opt_before = pickle.dumps(state["optimizer"].state_dict())
    refused = ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with CheckpointManager(str(run), readonly=True) as mgr:
                mgr.restore(state)
        except IncompatibleCheckpointError as exc:
            refused = str(exc)
        except Exception as exc:  # noqa: BLE001
            refused = f"uncaught {type(exc).__name__}"
    after = state["model"].state_dict()
    model_same = all(torch.equal(before[k], after[k]) for k in before)
    opt_same = pickle.dumps(state["optimizer"].state_dict()) == opt_before
    ok = bool(refused) and not refused.startswith("uncaught") and model_same and opt_same
    observed = (
        ("refused" if refused and not refused.startswith("uncaught") else refused or "accepted")
        + f"; model {'unchanged' if model_same else 'OVERWRITTEN'}"
        + f"; optimizer {'unchanged' if opt_same else 'CHANGED'}"
    )
    return Case("mismatched-optimizer restore", "4", expected, observed, PASS if ok else FAIL)


def legacy_keys(tmp: Path, quick: bool = False) -> Case:
    import torch

    from ckptkit import load

    path = tmp / "legacy.pt"
    model = torch.nn.Linear(4, 3)
    torch.save(
        {"model": model.state_dict(), "best_score": 0.5, "val_loss_min": 0.1, "global_step": 7},
        path,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = load(str(path))
    missing = [k for k in ("best_score", "val_loss_min", "global_step") if k not in got]
    return Case(
        "legacy dict checkpoint keys",
        "7",
        "`ckptkit.load` returns every key the file held, under its own name",
        "all kept" if not missing else f"dropped or renamed: {', '.join(missing)}",
        PASS if not missing else FAIL,
    )


def all_damaged_resume(tmp: Path, quick: bool = False) -> Case:
    from ckptkit import CheckpointManager, CkptError

    run = tmp / "run"
    _saved_run(run, (1, 2))
    for step in (1, 2):
        os.truncate(_ckpt(run, step) / "model.safetensors", 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with CheckpointManager(str(run)) as mgr:
                got = mgr.resume(_state(0), "auto")
            observed, ok = f"resume auto returned {got!r} (started fresh)", False
        except CkptError as exc:
            observed, ok = f"refused: {type(exc).__name__}", True
    return Case(
        "resume auto with every checkpoint damaged",
        "8",
        "refuses, naming the damaged checkpoints, instead of starting fresh",
        observed,
        PASS if ok else FAIL,
    )


# name -> (function, item of issue 9, runs in quick mode)
CASES: dict[str, tuple[Callable[[Path, bool], Case], str, bool]] = {
    "symlinked member to a secret file": (symlinked_member, "2", True),
    "symlinked checkpoint directory": (symlinked_checkpoint_dir, "2", True),
    "FIFO member": (fifo_member, "2", True),  # 10 s against today's code
    "'..' names in the manifest": (dotdot_names, "2", True),
    "malformed manifest fields": (malformed_manifest, "3", True),
    "truncated file": (truncated_file, "-", True),
    "flipped byte": (flipped_byte, "-", True),
    "malicious pickle in state.pt": (malicious_pickle, "-", True),
    "full disk": (full_disk, "6", True),
    "vanished Drive mount": (vanished_drive, "1", True),
    "dead GCS endpoint": (dead_gcs, "5", False),  # up to 90 s against today's code
    "mismatched-optimizer restore": (mismatched_optimizer, "4", True),
    "legacy dict checkpoint keys": (legacy_keys, "7", True),
    "verify on a damaged checkpoint": (verify_exit_code, "8", True),
    "resume auto with every checkpoint damaged": (all_damaged_resume, "8", True),
}


def run_cases(root: Path, *, quick: bool) -> list[Case]:
    out: list[Case] = []
    for name, (fn, item, in_quick) in CASES.items():
        if quick and not in_quick:
            out.append(Case(name, item, "-", "skipped in --quick mode (slow)", SKIP))
            continue
        tmp = Path(tempfile.mkdtemp(prefix="case-", dir=root))
        started = time.monotonic()
        try:
            case = fn(tmp, quick)
        except Exception as exc:  # noqa: BLE001 - a case that crashes is a failing case
            case = Case(name, item, "-", f"the case crashed: {type(exc).__name__}: {exc}", FAIL)
        case.name, case.item = name, item
        if not case.seconds:
            case.seconds = time.monotonic() - started
        out.append(case)
        print(f"  case {name}: {case.outcome} ({case.seconds:.1f} s)", flush=True)
    return out
