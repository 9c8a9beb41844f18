"""Data-parallel training under torchrun (2 processes, gloo on CPU): trained in two
pieces it ends bit-identical to one uninterrupted run, and only rank 0 writes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ckptkit

from .train_script import CKPTKIT, ROOT, assert_same_weights, cli_env, trainable

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))
ARGS = ["--seq-len", "32", "--label-len", "16", "--pred-len", "8", "--batch-size", "4",
        "--save-steps", "3", "--eval-batches", "2", "--log-every", "3", "--no-progress"]  # fmt: skip

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(TORCHRUN is None or CKPTKIT is None, reason="needs torchrun and ckptkit"),
]


def torchrun_train(run: Path, max_steps: int) -> subprocess.CompletedProcess[str]:
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", CKPTKIT, "train", *ARGS,
           "--max-steps", str(max_steps), "--output", str(run)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_two_ranks_in_pieces_equal_two_ranks_uninterrupted(tmp_path: Path) -> None:
    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    out = torchrun_train(whole, 12).stdout
    # Rank 0 alone reports and writes: one "done" line, one lock holder, one run name.
    assert out.count("done: step 12") == 1, out
    torchrun_train(pieces, 6)
    resumed = torchrun_train(pieces, 12).stdout
    assert "resumed at step 6" in resumed, resumed
    assert_same_weights(trainable(pieces), trainable(whole))
    loader = ckptkit.load(str(whole))["loader"]
    assert loader["world_size"] == 2 and loader["batches_yielded"] == 12
    assert not (whole / ".lock").exists()
