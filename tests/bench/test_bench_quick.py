"""``python -m bench --quick``: every benchmark row runs and the restores are correct.

Correctness only, never timing: the quick run (tiny state, one repetition) is run as a
user runs it, in a subprocess, and its tables are read back: every table and every row
is there, each target has a verdict, and every restore gave back the bytes that were
saved. The in-process test checks the byte check itself: it catches a restore that
loads nothing, and every baseline writer round-trips the state's tied and
non-contiguous tensors.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
TABLES = ("save", "restore", "memory", "latest", "gs", "overhead", "summary")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench-quick")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(REPO / "plugins"), env.get("PYTHONPATH", "")]
    )
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=850,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _rows(text: str) -> dict[str, list[str]]:
    """First cell -> the other cells, for every table row of a markdown file."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_every_table_and_row_is_written(quick: Path) -> None:
    from bench import gs, memory, overhead, save_restore

    text = {name: (quick / f"{name}.md").read_text() for name in TABLES}
    expected = {
        "save": [
            save_restore.RAW,
            save_restore.TORCH,
            save_restore.ST,
            save_restore.DCP,
            save_restore.SYNC,
            save_restore.ASYNC_BLOCK,
            save_restore.ASYNC_COMMIT,
        ],
        "restore": [
            save_restore.T_LOAD,
            save_restore.ST_LOAD,
            save_restore.VERIFIED,
            save_restore.UNVERIFIED,
        ],
        "memory": list(memory.METHODS.values()),
        "latest": ["local", "gs://"],
        "gs": [gs.CKPTKIT, gs.PIPE],
        "overhead": [overhead.BARE, overhead.WITH, overhead.NO_SAVE, overhead.SYNC, overhead.ASYNC],
    }
    for name, rows in expected.items():
        found = _rows(text[name])
        missing = [r for r in rows if r not in found]
        assert not missing, f"{name}.md lacks rows {missing}"
        # A row is measured, or says why not; it never crashed the run into a blank.
        for row in rows:
            assert found[row] and found[row][0], f"{name}.md: row {row!r} is empty"
    for name in TABLES:
        assert "load average" in text[name] and "CPUs" in text[name] and "torch 2." in text[name]
        assert re.search(r"at git [0-9a-f]{7,}", text[name]), f"{name}.md names no commit"
        if name != "summary":
            assert "## Targets" in text[name] or name == "overhead"
    verdicts = re.findall(r"\*\*(PASS|FAIL|n/a)\*\*", text["summary"])
    assert len(verdicts) >= 10, text["summary"]


def test_restored_bytes_equal_the_saved(quick: Path) -> None:
    from bench import save_restore

    restore = _rows((quick / "restore.md").read_text())
    for row in (
        save_restore.T_LOAD,
        save_restore.ST_LOAD,
        save_restore.VERIFIED,
        save_restore.UNVERIFIED,
    ):
        assert restore[row][-1] == "yes", f"{row}: restored bytes differ from the saved"
    summary = (quick / "summary.md").read_text()
    assert re.search(r"every restore gives back the saved bytes \| all equal \| \*\*PASS", summary)
    latest = _rows((quick / "latest.md").read_text())
    assert latest["local"][-1] == "yes", latest  # latest() found the newest checkpoint
    small, big = latest["local"][-2].split(" / ")  # manifests read: the same at both sizes
    assert small == big and int(small) >= 1, latest
    if not latest["gs://"][0].startswith("n/a"):
        assert latest["gs://"][-1] == "yes", latest


def test_byte_check_catches_a_restore_that_loads_nothing(tmp_path: Path) -> None:
    import torch

    from bench import _state, _writers

    model, opt = _state.build(1)
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()
    assert any(not t.is_contiguous() for t in sd.values())
    saved = _state.digest(model, opt)
    for save in (_writers.torch_save, _writers.safetensors_save, _writers.dcp_save):
        save(model, opt, tmp_path)
    _state.scramble(model, opt)
    assert _state.digest(model, opt) != saved  # a no-op restore would be caught
    for load in (_writers.torch_load, _writers.safetensors_load, _writers.dcp_load):
        _state.scramble(model, opt)
        load(model, opt, tmp_path)
        assert _state.digest(model, opt) == saved, load.__name__
        assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    raw = tmp_path / "raw.bin"
    _writers.raw_write(_writers.raw_buffers(model, opt), raw)
    assert raw.stat().st_size == _state.nbytes(model, opt)
    assert isinstance(torch.load(tmp_path / "state.pt", weights_only=True), dict)
