"""CheckpointManager conformance: the same save / list / latest / restore / rotate /
corrupt-and-skip behaviour on every storage backend (``backend_url`` fixture)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from ckptkit import CheckpointManager, CheckpointWarning, RunLockedError, hookimpl, open_storage
from ckptkit.hooks.manager import get_plugin_manager, reset_plugin_manager
from ckptkit.manifest import MANIFEST, parse_name
from ckptkit.storage import drive as drive_mod


@pytest.fixture(autouse=True)
def fresh_plugins():
    reset_plugin_manager()
    yield
    reset_plugin_manager()


def _state(value: float) -> dict:
    torch.manual_seed(int(value))
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(value)
    return {"model": model, "epoch": int(value)}


def _weight(state: dict) -> float:
    return float(state["model"].weight.detach()[0, 0])


def test_save_list_latest_restore(backend_url: str) -> None:
    with CheckpointManager(backend_url, keep_last=None) as mgr:
        mgr.save(10, _state(1.0), {"loss": 0.5})
        mgr.save(20, _state(2.0), {"loss": 0.4})
        assert [c.step for c in mgr.list()] == [10, 20]
    with CheckpointManager(backend_url) as mgr:  # a new process's view, after the flush
        assert [c.step for c in mgr.list()] == [10, 20]
        assert mgr.latest().step == 20
        state = _state(0.0)
        assert mgr.restore(state) == 20
        assert _weight(state) == 2.0 and state["epoch"] == 2
        assert mgr.restore(state, 10) == 10 and _weight(state) == 1.0


def test_rotation_keeps_last_n(backend_url: str) -> None:
    with CheckpointManager(backend_url, keep_last=2) as mgr:
        for step in (1, 2, 3, 4):
            mgr.save(step, _state(float(step)))
        assert [c.step for c in mgr.list()] == [3, 4]
    storage = open_storage(backend_url)
    try:
        names = [n for n in storage.listdir("") if parse_name(n)]
        assert len(names) == 2  # the old folders are gone, not just their manifests
    finally:
        storage.close()


def test_corrupt_latest_is_skipped(backend_url: str) -> None:
    with CheckpointManager(backend_url, keep_last=None) as mgr:
        mgr.save(10, _state(1.0))
        info = mgr.save(20, _state(2.0))
        fname = next(iter(info.manifest.files))
        key = f"{info.name}/{fname}"
        data = bytearray(mgr.storage.read_bytes(key))
        data[-1] ^= 0xFF  # same size: only the sha256 can tell
        mgr.storage.write_bytes(key, bytes(data))
    with CheckpointManager(backend_url) as mgr:
        state = _state(0.0)
        with pytest.warns(CheckpointWarning, match=info.name):
            assert mgr.restore(state) == 10
        assert _weight(state) == 1.0


def test_checkpoint_without_manifest_is_invisible(backend_url: str) -> None:
    with CheckpointManager(backend_url, keep_last=None) as mgr:
        mgr.save(10, _state(1.0))
        info = mgr.save(20, _state(2.0))
        mgr.storage.delete(f"{info.name}/{MANIFEST}")  # as if the commit never happened
        assert [c.step for c in mgr.list()] == [10]
    with CheckpointManager(backend_url) as mgr:  # the leftover folder is cleaned up
        assert [c.step for c in mgr.list()] == [10]
        assert info.name not in mgr.storage.listdir("")


def test_second_writer_is_refused(backend_url: str) -> None:
    with CheckpointManager(backend_url) as mgr:
        mgr.save(1, _state(1.0))
        with pytest.raises(RunLockedError):
            CheckpointManager(backend_url)
    with CheckpointManager(backend_url) as mgr:  # released on close
        assert mgr.latest().step == 1


def test_drive_save_returns_while_drive_hangs(
    drive_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training goes on while Drive is slow; the commit is announced once it is there."""
    gate = threading.Event()
    real = drive_mod._copy_file

    def slow(src: str, dst: str) -> str:
        assert gate.wait(10)
        return real(src, dst)

    monkeypatch.setattr(drive_mod, "_copy_file", slow)
    committed: list[int] = []

    class Plugin:
        @hookimpl
        def ckptkit_after_commit(self, manager, info) -> None:
            committed.append(info.step)

    get_plugin_manager().register(Plugin())
    url = "drive://T-L/runs/etth1"
    run = drive_root / "T-L/runs/etth1"
    with CheckpointManager(url, keep_last=1) as mgr:
        gate.set()
        first = mgr.save(1, _state(1.0))
        mgr.wait()
        gate.clear()
        second = mgr.save(2, _state(2.0))  # returns although nothing reaches Drive
        assert committed == [1]
        assert [c.step for c in mgr.list()] == [2]  # its own writes are visible at once
        # On Drive the old checkpoint stays until the new one is committed there.
        assert _checkpoints_on(run) == [first.name]
        assert (run / first.name / MANIFEST).exists()
        gate.set()
        mgr.wait()
        assert committed == [1, 2]
    assert _checkpoints_on(run) == [second.name]
    assert (run / second.name / MANIFEST).exists()


def _checkpoints_on(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if parse_name(p.name))
