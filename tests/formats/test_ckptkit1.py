"""Checkpoints written in format ``ckptkit/1`` (sha256, ``state.pt``) by the ckptkit
that preceded format 2 keep listing, verifying, inspecting, converting and restoring.
The fixture under tests/fixtures/ckptkit1/ was made by that old code
(tests/fixtures/make_ckptkit1.py)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ckptkit
from ckptkit import CheckpointManager, CorruptCheckpointError
from ckptkit.cli import _register_commands, cli
from ckptkit.manifest import MANIFEST

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")
NAME = "step-000000000003"


def _fixture_module():
    sys.path.insert(0, FIXTURES)
    try:
        import make_ckptkit1
    finally:
        sys.path.remove(FIXTURES)
    return make_ckptkit1


@pytest.fixture
def old_run(tmp_path) -> str:
    run = str(tmp_path / "run")
    shutil.copytree(os.path.join(FIXTURES, "ckptkit1", "run"), run)
    return run


@pytest.fixture(scope="module")
def expected() -> dict:
    return torch.load(os.path.join(FIXTURES, "ckptkit1", "expected.pt"), weights_only=True)


def invoke(*args: str):
    _register_commands()
    return CliRunner().invoke(cli, list(args))


def test_fixture_is_format_1(old_run):
    manifest = json.loads(Path(old_run, NAME, MANIFEST).read_text())
    assert manifest["format"] == "ckptkit/1"
    assert all(set(f) == {"sha256", "size"} for f in manifest["files"].values())


def test_restores_everything(old_run, expected):
    state = _fixture_module().build()
    with CheckpointManager(old_run, config={"lr": 0.01}) as mgr:
        result = mgr.restore(state)
    assert result.step == 3
    model = state["model"]
    for k, v in expected["model"].items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model.out.weight is model.emb.weight  # the model's own tying is untouched
    assert torch.equal(state["optimizer"].state_dict()["state"][0]["exp_avg"], expected["exp_avg"])
    assert state["scheduler"].last_epoch == expected["last_epoch"]
    assert state["loader"].state_dict()["batches_yielded"] == expected["batches"]
    assert torch.equal(torch.rand(3), expected["next_rand"])  # the RNG state came back
    assert state["note"] == "ckptkit/1 fixture"


def test_load_and_inspect(old_run, expected):
    state = ckptkit.load(old_run)
    assert torch.equal(state["ema"]["mid.bias"], expected["ema"]["mid.bias"])
    info = ckptkit.inspect(os.path.join(old_run, NAME))
    assert (
        info["format"] == "ckptkit"
        and info["step"] == 3
        and not any("optimizer" in n or "RNG" in n for n in info["lacks"])
    )


def test_cli_ls_verify_inspect(old_run):
    ls = invoke("ls", "--json", old_run)
    assert ls.exit_code == 0, ls.output
    rows = json.loads(ls.output)
    assert [r["status"] for r in rows] == ["complete"]
    verify = invoke("verify", old_run)
    assert verify.exit_code == 0, verify.output
    assert invoke("inspect", old_run).exit_code == 0


def test_verify_still_checks_sha256(old_run):
    path = Path(old_run, NAME, "ema.safetensors")
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert invoke("verify", old_run).exit_code == 4
    with pytest.raises(CorruptCheckpointError, match="sha256"):
        ckptkit.load(os.path.join(old_run, NAME))


def test_convert_to_current_format(old_run, tmp_path, expected):
    dst = str(tmp_path / "new")
    result = invoke("convert", os.path.join(old_run, NAME), dst)
    assert result.exit_code == 0, result.output
    state = ckptkit.load(dst)
    assert torch.equal(state["ema"]["mid.weight"], expected["ema"]["mid.weight"])
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], expected["exp_avg"])
