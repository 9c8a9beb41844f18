"""Atomic commits: damaged, incomplete and interrupted checkpoints are never read, and
never cost the checkpoints before them (including a real SIGKILL at random moments)."""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

from ckptkit import CheckpointManager, CheckpointWarning, StorageError
from ckptkit import run as runmod
from ckptkit.atomic.strategies import TMP_PREFIX
from ckptkit.manifest import MANIFEST
from ckptkit.storage.local import LocalStorage

from .helpers import flip_byte, truncate


def _state(step: int) -> dict:
    return {
        "model": {"w": torch.full((64,), float(step)), "b": torch.arange(4.0) + step},
        "extra": {"step": step, "hist": [float(step)]},
    }


def _saved_run(run_dir: str, steps=(1, 2, 3), **kwargs) -> None:
    with CheckpointManager(run_dir, keep_last=None, **kwargs) as mgr:
        for s in steps:
            mgr.save(s, _state(s))


def _ckpt(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"step-{step:012d}")


def _restore(run_dir: str, **kwargs) -> tuple[int | None, dict]:
    state = _state(0)
    with CheckpointManager(run_dir, readonly=True) as mgr:
        return mgr.restore(state, **kwargs), state


def _visible_tmp(run_dir: str) -> list[str]:
    return [n for n in os.listdir(run_dir) if n.startswith(TMP_PREFIX)]


# -- damaged checkpoints -------------------------------------------------------


@pytest.mark.parametrize("fname", ["model.safetensors", "state.json"])
def test_flipped_byte_is_skipped_with_a_warning_naming_it(run_dir, fname):
    _saved_run(run_dir)
    flip_byte(os.path.join(_ckpt(run_dir, 3), fname), offset=-2)
    with pytest.warns(CheckpointWarning, match=rf"step-000000000003/{fname}.*xxh3"):
        step, state = _restore(run_dir)
    assert step == 2
    assert state["extra"]["step"] == 2 and state["model"]["w"][0].item() == 2.0


def test_verify_false_skips_the_hash_check(run_dir):
    _saved_run(run_dir)
    # Damage a weight value, not the header: the file still decodes.
    flip_byte(os.path.join(_ckpt(run_dir, 3), "model.safetensors"), offset=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        step, state = _restore(run_dir, verify=False)
    assert step == 3
    assert not all(torch.equal(state["model"][k], _state(3)["model"][k]) for k in ("w", "b"))


def test_truncated_file_is_skipped_by_restore_and_latest(run_dir):
    _saved_run(run_dir)
    truncate(os.path.join(_ckpt(run_dir, 3), "state.json"))
    with pytest.warns(CheckpointWarning, match="step-000000000003/state.json"):
        assert _restore(run_dir)[0] == 2
    with (
        CheckpointManager(run_dir, readonly=True) as mgr,
        pytest.warns(CheckpointWarning, match="size differs"),
    ):
        assert mgr.latest().step == 2


def test_missing_file_is_skipped(run_dir):
    _saved_run(run_dir)
    os.remove(os.path.join(_ckpt(run_dir, 3), "model.safetensors"))
    with pytest.warns(CheckpointWarning, match="model.safetensors is missing"):
        assert _restore(run_dir)[0] == 2


def test_unreadable_manifest_is_skipped_with_a_warning(run_dir):
    _saved_run(run_dir)
    with open(os.path.join(_ckpt(run_dir, 3), MANIFEST), "w") as f:
        f.write('{"format": "ckptkit/1", "step"')
    with pytest.warns(CheckpointWarning, match="step-000000000003: unreadable manifest"):
        assert _restore(run_dir)[0] == 2


def test_every_checkpoint_damaged_means_nothing_to_restore(run_dir):
    _saved_run(run_dir, steps=(1, 2))
    for step in (1, 2):
        truncate(os.path.join(_ckpt(run_dir, step), "model.safetensors"))
    with pytest.warns(CheckpointWarning):
        assert not _restore(run_dir)[0].resumed


def test_directory_without_manifest_does_not_exist_for_readers(run_dir):
    _saved_run(run_dir, steps=(1, 2))
    shutil.copytree(_ckpt(run_dir, 2), _ckpt(run_dir, 9))
    os.remove(os.path.join(_ckpt(run_dir, 9), MANIFEST))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)  # silently ignored: by design
        assert [c.step for c in runmod.list_checkpoints(LocalStorage(run_dir))] == [1, 2]
        assert _restore(run_dir)[0] == 2
    with CheckpointManager(run_dir):  # the next writer cleans it up
        pass
    assert not os.path.exists(_ckpt(run_dir, 9))


# -- leftovers of interrupted saves --------------------------------------------


def test_leftover_temp_dirs_are_ignored_by_readers_and_removed_by_the_next_writer(run_dir):
    _saved_run(run_dir, steps=(1,))
    # A complete-looking temp dir (manifest and all) is still not a checkpoint.
    leftover = os.path.join(run_dir, f"{TMP_PREFIX}step-000000000005-deadbeef")
    shutil.copytree(_ckpt(run_dir, 1), leftover)
    with CheckpointManager(run_dir, readonly=True) as reader:
        assert [c.name for c in reader.list()] == ["step-000000000001"]
        assert reader.restore(_state(0)) == 1
    assert os.path.isdir(leftover)  # readers never delete
    with CheckpointManager(run_dir) as writer:
        assert _visible_tmp(run_dir) == []
        assert [c.step for c in writer.list()] == [1]


def _tree(run_dir: str) -> dict[str, bytes]:
    """Every checkpoint file and its content."""
    out = {}
    for root, _, files in os.walk(run_dir):
        for name in files:
            path = os.path.join(root, name)
            if "step-" in path:
                with open(path, "rb") as f:
                    out[os.path.relpath(path, run_dir)] = f.read()
    return out


def _fail_on_call(storage, monkeypatch, n: int, exc: BaseException) -> None:
    """The ``n``-th file write (``write_bytes`` or ``write_stream``) raises ``exc``, after
    the first chunk of a stream was written (a disk that fills mid-file)."""
    real_bytes, real_stream = storage.write_bytes, storage.write_stream
    calls = {"n": 0}

    def write_bytes(key: str, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        real_bytes(key, data)

    def write_stream(key: str, chunks, size=None) -> None:
        calls["n"] += 1
        if calls["n"] != n:
            return real_stream(key, chunks, size)

        def failing():
            yield next(iter(chunks))
            raise exc

        return real_stream(key, failing(), size)

    monkeypatch.setattr(storage, "write_bytes", write_bytes)
    monkeypatch.setattr(storage, "write_stream", write_stream)


@pytest.mark.parametrize("commit", ["rename", "marker"])
def test_disk_full_mid_save_is_a_storage_error_and_changes_nothing(run_dir, monkeypatch, commit):
    _saved_run(run_dir, steps=(1, 2), commit=commit)
    before = _tree(run_dir)
    with CheckpointManager(run_dir, keep_last=1, commit=commit) as mgr:
        _fail_on_call(mgr.storage, monkeypatch, 2, OSError(errno.ENOSPC, "No space left"))
        with pytest.raises(StorageError, match="disk is full"):
            mgr.save(3, _state(3))
        monkeypatch.undo()
        assert [c.step for c in mgr.list()] == [1, 2]  # no rotation either
        for info in mgr.list():
            runmod.verify(mgr.storage, info)
        assert not os.path.exists(_ckpt(run_dir, 3))
        assert _visible_tmp(run_dir) == []
        assert _tree(run_dir) == before
        mgr.save(3, _state(3))  # the manager is still usable once there is room
        assert [c.step for c in mgr.list()] == [3]


def test_interrupt_mid_save_propagates_and_leaves_no_temp_dir(run_dir, monkeypatch):
    _saved_run(run_dir, steps=(1,))
    with CheckpointManager(run_dir) as mgr:
        _fail_on_call(mgr.storage, monkeypatch, 1, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            mgr.save(2, _state(2))
        monkeypatch.undo()
        assert [c.step for c in mgr.list()] == [1]
        assert _visible_tmp(run_dir) == []


# -- real SIGKILL --------------------------------------------------------------

# A zygote imports torch and ckptkit once (3 s), then forks one writer per round, so
# each round costs a save or two instead of an interpreter start. No torch op runs in
# the zygote before it forks (thread pools are not fork-safe); it reaps each killed
# writer before forking the next, so the run lock's pid really is dead by then.
_ZYGOTE = textwrap.dedent(
    """
    import os
    import sys

    import torch
    from ckptkit import CheckpointManager

    def writer(run):
        # ~16 MB per checkpoint, so a save takes long enough to be killed in the middle.
        state = {
            "model": {"a": torch.randn(2_000_000), "b": torch.randn(1_000_000)},
            "optimizer": {"m": torch.randn(1_000_000), "count": 0},
        }
        with CheckpointManager(run, keep_last=3, keep_best=0) as mgr:
            step = mgr.restore(state) or 0
            print("ready", step, flush=True)
            while True:
                step += 1
                state["model"]["a"][0] = step
                state["optimizer"]["count"] = step
                mgr.save(step, state)
                print("saved", step, flush=True)

    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            try:
                writer(line.strip())
            finally:
                os._exit(1)
        print("pid", pid, flush=True)
        os.waitpid(pid, 0)
        print("reaped", flush=True)
    """
)


def _check_run(run_dir: str, seen: dict[str, bytes]) -> list[int]:
    """Every visible checkpoint verifies fully and decodes; none changed since first seen."""
    storage = LocalStorage(run_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        infos = runmod.list_checkpoints(storage)
        for info in infos:
            runmod.verify(storage, info)  # sizes and sha256 of every file
            state = runmod.read_state(storage, info)
            assert state["optimizer"]["count"] == info.step
            assert state["model"]["a"][0].item() == info.step
            manifest = storage.read_bytes(f"{info.name}/{MANIFEST}")
            assert seen.setdefault(info.name, manifest) == manifest, info.name
    return [c.step for c in infos]


def _read_until(zygote: subprocess.Popen, prefix: str) -> list[str]:
    """Lines up to and including the first starting with ``prefix``."""
    lines = []
    while True:
        line = zygote.stdout.readline()
        assert line, f"the writer process ended unexpectedly after {lines}"
        lines.append(line.strip())
        if line.startswith(prefix):
            return lines


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_at_random_moments_never_loses_a_committed_checkpoint(run_dir, tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    script = tmp_path / "zygote.py"
    script.write_text(_ZYGOTE)
    zygote = subprocess.Popen(
        [sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    seen: dict[str, bytes] = {}
    latest = 0
    try:
        for round_ in range(8):
            where = f"round {round_}, seed {seed}"
            zygote.stdin.write(run_dir + "\n")
            zygote.stdin.flush()
            lines = _read_until(zygote, "ready")
            pid = next(int(ln.split()[1]) for ln in lines if ln.startswith("pid"))
            # It resumed from the newest checkpoint that survived the last kill.
            assert lines[-1] == f"ready {latest}", where
            for _ in range(1 if round_ == 0 else rng.choice([0, 0, 1])):
                _read_until(zygote, "saved")  # something to protect / a kill after a commit
            # Let it run into the middle of a save, a commit or a rotation.
            time.sleep(rng.uniform(0.0, 0.4))
            os.kill(pid, signal.SIGKILL)
            _read_until(zygote, "reaped")
            steps = _check_run(run_dir, seen)
            assert steps, f"{where}: no checkpoint left"
            assert steps[-1] >= latest, f"{where}: progress lost"
            latest = steps[-1]
    finally:
        zygote.kill()
        zygote.wait()
    assert len(seen) >= 2
    with CheckpointManager(run_dir) as mgr:  # the next writer removes what kills left
        names = os.listdir(run_dir)
        assert not [n for n in names if n.startswith(TMP_PREFIX)]
        assert all(
            os.path.exists(os.path.join(run_dir, n, MANIFEST))
            for n in names
            if n.startswith("step-")
        )
        assert mgr.latest().step == latest
