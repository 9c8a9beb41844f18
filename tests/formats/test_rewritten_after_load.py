"""A foreign or legacy file (``torch.save`` ``.pt``, a safetensors file) that is
truncated or rewritten in place after ckptkit read it must leave what was read intact.

Users do exactly that: ``ckptkit.load("ckpt.pt")``, then ``torch.save(..., "ckpt.pt")``
over the same name (``torch.save`` truncates the file first). Tensors still backed by a
mapping of the file would then kill the process with SIGBUS on their next use, or
silently change (a private mapping shows the file's new bytes on pages it has not
copied yet). Each case runs in a child process (a fresh interpreter: a forked one
could hang in the parent's OpenMP pool), so that a SIGBUS fails the test instead of
killing the test process.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

N = 2 << 20  # 8 MB of float32: thousands of pages, most untouched until summed


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(N, generator=g), "b": torch.randn(N // 2, generator=g)}


def _write(kind: str, path: Path) -> None:
    if kind == "torch":
        torch.save(_weights(), path)
    elif kind == "torch-dict":
        torch.save({"model": _weights(), "epoch": 3}, path)
    else:  # safetensors: by suffix, and by content under a torch-like name
        save_file(_weights(), path)


# What the child runs: read the file (argv[1]) as argv[2] says, change the file as
# argv[3] says, then print a digest of each tensor it read.
CHILD = """
import hashlib, json, os, sys, torch, ckptkit
path, how, change = sys.argv[1:4]
if how == "restore":
    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(torch.zeros(1024, COLUMNS))
    with ckptkit.CheckpointManager(os.path.join(os.path.dirname(path), "run")) as mgr:
        assert mgr.restore({"model": model}, path) == 7
    weights = {"a": model.weight.detach()}
else:
    loaded = ckptkit.load(path)
    weights = loaded["model"] if "model" in loaded else loaded
if change == "truncated":
    os.truncate(path, 100)
else:  # same size, other bytes, in place
    with open(path, "r+b") as f:
        f.write(bytes(os.path.getsize(path)))
        f.flush()
        os.fsync(f.fileno())
print(json.dumps({k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in weights.items()}))
""".replace("COLUMNS", str(N // 1024))


def _run_child(path: Path, how: str, change: str) -> dict[str, str]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), how, change],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, f"the child ended {proc.returncode}: {proc.stderr[-800:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _sums(weights: dict[str, torch.Tensor]) -> dict[str, str]:
    """A digest of each tensor's bytes (every page of it read, the values compared exactly)."""
    return {k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in weights.items()}


CHANGES = ["truncated", "overwritten"]
CASES = [("torch", "old.pt"), ("torch-dict", "old.pt"), ("st", "old.safetensors"), ("st", "x.bin")]


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize(("kind", "name"), CASES, ids=[f"{k}-{n}" for k, n in CASES])
def test_what_load_returned_survives_the_file_being_rewritten(
    tmp_path: Path, kind: str, name: str, change: str
) -> None:
    path = tmp_path / name
    _write(kind, path)
    # The child ran to its end (no SIGBUS) and read the values the file held.
    assert _run_child(path, "load", change) == _sums(_weights())


@pytest.mark.parametrize("change", CHANGES)
def test_a_model_restored_from_a_legacy_file_survives_it_being_rewritten(
    tmp_path: Path, change: str
) -> None:
    path = tmp_path / "old.pt"
    torch.save({"model": {"weight": _weights()["a"].reshape(1024, -1)}, "step": 7}, path)
    assert _run_child(path, "restore", change) == {"a": _sums(_weights())["a"]}
