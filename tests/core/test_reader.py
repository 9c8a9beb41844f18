"""Reading by URL (load / inspect / read_checkpoint) and the safe-loading guarantee:
restoring or loading never unpickles an arbitrary object, even one the manifest vouches for."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil

import pytest
import torch
from xxhash import xxh3_128_hexdigest

import ckptkit
from ckptkit import (
    CheckpointManager,
    CheckpointNotFoundError,
    CheckpointWarning,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)
from ckptkit.manifest import MANIFEST, sha256_bytes

from .helpers import flip_byte, make_training, tensors_equal


@pytest.fixture
def saved(run_dir):
    state = make_training()
    state.update(epoch=2, notes=["a", "b"])
    with CheckpointManager(run_dir, config={"lr": 0.1}) as mgr:
        mgr.save(10, state, {"val_loss": 0.5})
        mgr.save(20, state, {"val_loss": 0.25})
    return run_dir, state


def _ckpt(run: str, step: int) -> str:
    return os.path.join(run, f"step-{step:012d}")


def test_load_checkpoint_dir_returns_plain_state(saved):
    run, state = saved
    loaded = ckptkit.load(_ckpt(run, 10))
    assert set(loaded) == {"model", "optimizer", "scheduler", "epoch", "notes"}
    assert tensors_equal(dict(loaded["model"]), state["model"].state_dict())
    assert tensors_equal(loaded["optimizer"], state["optimizer"].state_dict())
    assert loaded["epoch"] == 2 and loaded["notes"] == ["a", "b"]


def test_load_run_reads_its_latest(saved):
    run, _ = saved
    data = ckptkit.read_checkpoint(run)
    assert data.step == 20 and data.source == _ckpt(run, 20)
    assert data.metrics == {"val_loss": 0.25} and data.kind == "native"


def test_load_file_url(saved):
    run, _ = saved
    assert ckptkit.read_checkpoint("file://" + _ckpt(run, 10)).step == 10


def test_inspect_describes_the_checkpoint(saved):
    run, _ = saved
    info = ckptkit.inspect(_ckpt(run, 20))
    assert (info["kind"], info["step"], info["epoch"]) == ("native", 20, 2)
    assert info["metrics"] == {"val_loss": 0.25}
    assert info["state"]["model"] == {"tensors": 4, "parameters": 58, "bytes": 232}
    assert info["state"]["epoch"] == 2 and info["state"]["notes"] == "list[2]"
    assert info["config"] == {"lr": 0.1}
    assert set(info["files"]) == {"model.safetensors", "state.json"}
    assert info["versions"]["ckptkit"] == ckptkit.__version__
    assert info["notes"] == []
    json.dumps(info)  # what `ckptkit inspect --json` prints


def test_unknown_path_is_not_found_in_one_line(tmp_path):
    with pytest.raises(CheckpointNotFoundError) as err:
        ckptkit.load(str(tmp_path / "missing"))
    assert str(err.value) == f"{tmp_path / 'missing'}: no such file or directory"


def test_directory_that_is_no_checkpoint_is_not_found(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(CheckpointNotFoundError, match="not a checkpoint ckptkit can read") as err:
        ckptkit.inspect(str(tmp_path))
    assert "\n" not in str(err.value)


def test_damaged_checkpoint_dir_is_corrupt_unless_verify_false(saved):
    run, _ = saved
    flip_byte(os.path.join(_ckpt(run, 20), "model.safetensors"))
    with pytest.raises(CorruptCheckpointError, match="model.safetensors: xxh3"):
        ckptkit.load(_ckpt(run, 20))
    assert "model" in ckptkit.load(_ckpt(run, 20), verify=False)
    with pytest.warns(CheckpointWarning, match="step-000000000020"):
        assert ckptkit.read_checkpoint(run).step == 10  # a run falls back to the older one


# -- safe loading --------------------------------------------------------------

PWNED = "ckptkit-test-pwned"


class Exploit:
    """Unpickling this calls os.system: it must never happen."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(checkpoint_dir: str, fname: str, payload: bytes) -> None:
    """Replace a file and re-sign the manifest: verification cannot save us here."""
    with open(os.path.join(checkpoint_dir, fname), "wb") as f:
        f.write(payload)
    path = os.path.join(checkpoint_dir, MANIFEST)
    with open(path) as f:
        manifest = json.load(f)
    if manifest["format"] == "ckptkit/1":
        manifest["files"][fname] = {"size": len(payload), "sha256": sha256_bytes(payload)}
    else:
        manifest["files"][fname] = {"size": len(payload), "xxh3": xxh3_128_hexdigest(payload)}
    with open(path, "w") as f:
        json.dump(manifest, f)


OLD_RUN = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "ckptkit1", "run")


@pytest.fixture
def booby_trapped(tmp_path):
    """A ckptkit/1 run (the format that pickled state into state.pt) whose state.pt is
    replaced by a pickle calling os.system, its manifest re-signed (sha256)."""
    run = str(tmp_path / "old")
    shutil.copytree(OLD_RUN, run)
    marker = str(tmp_path / PWNED)
    buf = io.BytesIO()
    torch.save({"epoch": Exploit(marker), "notes": []}, buf)
    _plant(_ckpt(run, 3), "state.pt", buf.getvalue())
    return run, marker


@pytest.mark.parametrize("verify", [True, False])
def test_load_never_unpickles_arbitrary_objects(booby_trapped, verify):
    run, marker = booby_trapped
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system|system"):
        ckptkit.load(_ckpt(run, 3), verify=verify)
    assert not os.path.exists(marker)


def test_restore_never_unpickles_arbitrary_objects(booby_trapped):
    run, marker = booby_trapped
    state = make_training()
    with CheckpointManager(run, readonly=True) as mgr, pytest.raises(UnsafeCheckpointError):
        mgr.restore(state)
    assert not os.path.exists(marker)
    assert state["optimizer"].state_dict()["state"] == {}  # nothing was loaded


def test_plain_pickle_in_safetensors_slot_is_refused(saved, tmp_path):
    run, _ = saved
    marker = str(tmp_path / PWNED)
    _plant(_ckpt(run, 20), "model.safetensors", pickle.dumps(Exploit(marker)))
    with pytest.raises(CorruptCheckpointError, match="safetensors"):
        ckptkit.load(_ckpt(run, 20))
    assert not os.path.exists(marker)
