"""The soak's training process: a tiny model trained with ckptkit, which says where it is.

One worker is one process of a run: it resumes the newest checkpoint (``resume="auto"``),
trains to ``steps`` saving every ``save_every`` steps with ``keep_last`` retention, and
reports over a pipe what a kill could interrupt. The parent (``trials.py``) SIGKILLs it.

Phases. ``restore`` is the manager's start-up (lock, clean-up of leftovers, replay of a
dead process's Drive uploads) and the resume; ``save`` is writing the files of a
checkpoint where readers cannot see them yet; ``commit`` is what makes it visible (the
rename of the temporary directory, or the manifest written last, or on Drive its upload);
``rotation`` is deleting what retention drops. A *point* is the instant before or after one
storage call inside a phase; every point is sent to the parent as ``("point", phase, what,
flag)`` and every change of phase as ``("phase", name)``, so the phase the process was in
when it died is the last one it reported.

The kill plan (``cfg["kill"]``) names a phase and ``nth``: at the nth point of that phase
the worker either stops dead until the signal comes (``hold``: the kill lands exactly
there) or reports the point and goes on (``now``: the parent kills after a random few
milliseconds, so the kill lands inside a storage call, or wherever the process got to);
``emulator`` stops until the parent, having killed the GCS emulator, says ``go``.

The state a checkpoint holds is digested (sha256 of every tensor's bytes and the RNG) when
it is saved and when it is restored, so the parent can tell a damaged restore from a good
one without trusting the checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import threading
import warnings
from collections import Counter
from multiprocessing.sharedctypes import RawArray
from typing import Any

from ckptkit import hookimpl

PHASES = ("save", "commit", "rotation", "restore")
_UPLOAD_THREAD = "ckptkit-drive"
_ASYNC_THREAD = "ckptkit-async-save"  # async_save's writer thread (gs://, drive://)
_MANIFEST = "manifest.json"
_TMP = ".tmp-"
# Storage calls that read or change a checkpoint; each is a point before and after.
_CALLS = (
    "read_bytes",
    "write_bytes",
    "create_exclusive",
    "delete",
    "rename",
    "mkdir",
    "sync_dir",
)


class Probe:
    """Reports phases and points to the parent and carries out the kill plan."""

    def __init__(self, conn: Any, kill: dict[str, Any] | None) -> None:
        self.conn = conn
        self.kill = kill or {}
        self.phase = "start"
        # Shared memory, not attributes: a forked async writer (async_save=True) counts
        # its points on the same tally and sees a kill that already fired.
        self._tally = RawArray("q", len(PHASES) + 1)  # points per phase, then "fired"
        self._send_lock = threading.Lock()
        self._fire_lock = threading.Lock()

    @property
    def counts(self) -> Counter[str]:
        return Counter({p: self._tally[i] for i, p in enumerate(PHASES) if self._tally[i]})

    @property
    def fired(self) -> bool:
        return bool(self._tally[len(PHASES)])

    def send(self, *msg: Any) -> None:
        with self._send_lock:  # the Drive upload thread reports too
            self.conn.send(msg)

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.send("phase", phase)

    def point(self, what: str, phase: str | None = None, *, last: bool = False) -> None:
        """One instant inside ``phase`` (default: the current one); ``last`` marks the end
        of a restore, where a restore kill that has not fired yet fires (a process
        restores only once)."""
        phase = phase or self.phase
        if phase not in PHASES:
            return
        # One decision at a time: a checkpoint's files are uploaded by several threads at
        # once (parallel_writes), and two of them firing would both wait on the one reply.
        with self._fire_lock:
            self._tally[PHASES.index(phase)] += 1
            target = self.kill.get("phase") == phase and not self.fired
            fire = target and (self.counts[phase] >= int(self.kill.get("nth", 1)) or last)
            mode = self.kill.get("mode") if fire else None
            if fire:
                self._tally[len(PHASES)] = 1
        self.send("point", phase, what, mode)
        if not fire:
            return
        if mode == "hold":
            while True:  # SIGKILL never returns; a parent gone (EOF) ends the wait
                if self.conn.poll(1.0):
                    self.conn.recv()
        if mode == "emulator":
            self.conn.recv()  # the parent killed the emulator: go on into the dead endpoint

    def call_phase(self, method: str, key: str) -> str:
        """The phase a storage call belongs to. Drive's upload thread works for the main
        thread's save: by what it uploads (files: save, the manifest: commit, deletes:
        rotation), except while the process is still starting (a replay: restore)."""
        thread = threading.current_thread().name
        if thread.startswith(_ASYNC_THREAD):
            # Writes for the save the main thread returned from: save until the commit.
            return "commit" if _commits(method, key) else "save"
        if not thread.startswith(_UPLOAD_THREAD):
            if self.phase == "save" and _commits(method, key):
                self.enter("commit")
            return self.phase
        if self.phase in ("restore", "start"):
            return "restore"
        if method == "delete":
            return "rotation"
        return "commit" if key.endswith(_MANIFEST) else "save"


def _commits(method: str, key: str) -> bool:
    """Whether this call is the one that makes a checkpoint visible."""
    if method == "rename":
        return True
    return method == "write_bytes" and key.endswith(_MANIFEST) and not key.startswith(_TMP)


def _instrument(probe: Probe) -> None:
    """Wrap the storage backends' calls (in this process only) so each is a point."""
    from ckptkit.storage.local import LocalStorage

    classes: list[type] = [LocalStorage]
    for module, name in (
        ("ckptkit.storage.drive", "DriveStorage"),
        ("ckptkit.storage.fsspec_backend", "FsspecStorage"),
    ):
        # Other backends may be absent (or renamed); their calls are then not points.
        with contextlib.suppress(ImportError, AttributeError):
            classes.append(getattr(importlib.import_module(module), name))
    for cls in classes:
        for method in _CALLS:
            real = cls.__dict__.get(method)
            if real is not None:
                setattr(cls, method, _wrapped(probe, method, real))
    # Drive's uploader copies staged files with a module-level helper: a point per upload.
    try:
        import ckptkit.storage.drive as drive
    except ImportError:
        return
    copy = getattr(drive, "_copy_file", None)
    if copy is not None:

        def copy_file(src: str, dst: str) -> str:
            phase = probe.call_phase("upload", dst)
            probe.point(f"upload {os.path.basename(dst)}", phase)
            out = copy(src, dst)
            probe.point(f"uploaded {os.path.basename(dst)}", phase)
            return out

        drive._copy_file = copy_file


def _wrapped(probe: Probe, method: str, real: Any) -> Any:
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        key = str(args[0]) if args else ""
        phase = probe.call_phase(method, key)
        probe.point(f"{method} {key}", phase)
        out = real(self, *args, **kwargs)
        probe.point(f"{method} {key} done", phase)
        return out

    return call


def digest(state: dict[str, Any]) -> str:
    """sha256 of everything a resumed run depends on: weights, optimizer, schedule, step
    and the torch RNG (which the Dropout draws from)."""
    import torch

    h = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            h.update(str(value.dtype).encode())
            h.update(
                value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
            )
        elif isinstance(value, dict):
            for k in sorted(value, key=str):
                h.update(repr(k).encode())
                feed(value[k])
        elif isinstance(value, (list, tuple)):
            for v in value:
                feed(v)
        else:
            h.update(repr(value).encode())

    for key in ("model", "optimizer", "scheduler"):
        feed(state[key].state_dict())
    feed(state["step"])
    feed(state["losses"])
    feed(torch.get_rng_state())
    return h.hexdigest()


def build(seed: int, steps: int) -> dict[str, Any]:
    import torch
    from torch import nn

    from ckptkit import RNGState

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Dropout(0.1), nn.Linear(256, 64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=steps)
    return {
        "model": model,
        "optimizer": opt,
        "scheduler": sched,
        "rng": RNGState(),
        "step": 0,
        "losses": [],
    }


def train_step(state: dict[str, Any], seed: int) -> float:
    import torch

    step = state["step"]
    g = torch.Generator().manual_seed(seed * 100_003 + step)  # the data of this step
    x = torch.randn(32, 64, generator=g)
    loss = torch.nn.functional.mse_loss(state["model"](x), torch.sin(x))
    loss.backward()
    state["optimizer"].step()
    state["optimizer"].zero_grad(set_to_none=True)
    state["scheduler"].step()
    state["step"] = step + 1
    state["losses"].append(loss.item())
    return float(loss.item())


class _Reporter:
    """The ckptkit plugin that turns manager events into reports."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    @hookimpl
    def ckptkit_before_save(self, manager: Any, step: int, state: dict[str, Any]) -> None:
        self.probe.enter("save")
        self.probe.send("saving", step, digest(state))

    @hookimpl
    def ckptkit_after_commit(self, manager: Any, info: Any) -> None:
        self.probe.send("committed", info.name, info.step)

    @hookimpl
    def ckptkit_before_delete(self, manager: Any, info: Any) -> None:
        if self.probe.phase != "restore":
            self.probe.enter("rotation")
        self.probe.send("deleting", info.name, info.step)

    @hookimpl
    def ckptkit_after_restore(self, manager: Any, info: Any, state: dict[str, Any]) -> None:
        self.probe.send("restored", info.name, info.step, digest(state))


def main(cfg: dict[str, Any], conn: Any) -> None:
    """The process's whole life (the target the parent starts): ``cfg`` holds ``url``,
    ``seed``, ``steps``, ``save_every``, ``keep_last``, ``env``, ``kill`` and optionally
    ``async_save`` (then a save's files are written by a forked child, whose points are
    reported like the process's own, or by a thread). An error
    is reported as ``("error", type, one line)`` and the process exits 1."""
    try:
        _run(cfg, conn)
    except BaseException as exc:  # noqa: BLE001 - reported, then the process fails
        conn.send(("error", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else ""))
        os._exit(1)


def _run(cfg: dict[str, Any], conn: Any) -> None:
    os.environ.update(cfg.get("env", {}))
    # Skipping a checkpoint a kill left damaged warns; the parent checks what was restored.
    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)
    from ckptkit import CheckpointManager
    from ckptkit.hooks.manager import get_plugin_manager

    probe = Probe(conn, cfg.get("kill"))
    _instrument(probe)
    get_plugin_manager().register(_Reporter(probe), name="soak-reporter")

    seed, steps = int(cfg["seed"]), int(cfg["steps"])
    state = build(seed, steps)
    probe.enter("restore")
    mgr = CheckpointManager(
        cfg["url"],
        keep_last=int(cfg["keep_last"]),
        keep_best=0,
        save_every_steps=cfg["save_every"],
        async_save=bool(cfg.get("async_save", False)),
        async_snapshot=str(cfg.get("async_snapshot", "deferred")),
    )
    with mgr:
        restored = mgr.resume(state, "auto")
        probe.point("restored", last=True)
        if restored is None:
            probe.send("fresh")
        probe.enter("train")
        write_behind = bool(getattr(mgr.storage, "write_behind", False))
        while state["step"] < steps:
            loss = train_step(state, seed)
            if mgr.maybe_save(state["step"], state, metrics={"loss": loss}) is not None:
                if write_behind:  # the upload is the commit: wait for it to be durable
                    probe.enter("commit")
                    mgr.wait()
                probe.enter("train")
        probe.enter("close")
    probe.send("done", digest(state), dict(probe.counts))
