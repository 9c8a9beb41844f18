"""``bench/gpu_checks.py`` on a machine without CUDA: it says so and exits 0, and its
``--dry-run`` runs every check at tiny size on CPU and writes the table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .train_script import ROOT

SCRIPT = ROOT / "bench" / "gpu_checks.py"
CHECKS = (
    "gpt2_bf16_step",
    "cuda_rng_resume",
    "gpu_state_roundtrip",
    "llama_4bit_load",
    "cuda_async_save",
)


def run_script(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def rows(table: str) -> dict[str, str]:
    cells = [
        line.split("|")
        for line in table.splitlines()
        if line.startswith("| ") and "---" not in line
    ]
    return {c[1].strip(): c[2].strip() for c in cells[1:]}


def test_without_cuda_it_says_so_and_exits_0(tmp_path: Path) -> None:
    results = ROOT / "bench" / "results" / "gpu.md"
    before = results.stat().st_mtime_ns if results.exists() else None
    done = run_script(cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout
    assert (results.stat().st_mtime_ns if results.exists() else None) == before


def test_dry_run_of_only_the_checks_named(tmp_path: Path) -> None:
    # Two in-process checks are enough to show --only runs those named and no other; each
    # check passing is test_dry_run_of_every_check's (that run already makes every row).
    out = tmp_path / "gpu.md"
    only = "gpu_state_roundtrip,cuda_async_save"
    done = run_script("--dry-run", "--only", only, "--out", out, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    table = out.read_text()
    assert "CPU dry run" in table and "torch " in table and "commit " in table
    assert rows(table) == {name: "ok" for name in only.split(",")}, table


@pytest.mark.slow
def test_dry_run_of_every_check(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    done = run_script("--dry-run", "--out", out, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    table = out.read_text()
    assert "CPU dry run" in table and "torch " in table and "commit " in table
    assert rows(table) == {name: "ok" for name in CHECKS}, table
    assert "bit-identical" in table
    bad = run_script("--dry-run", "--only", "nope", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown check" in bad.stderr
