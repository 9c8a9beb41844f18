"""The ckptkit CLI: inspect, ls, verify, convert through CliRunner, plus real runs of the
installed console script (one-line errors, exit codes, never a traceback)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import click
import pytest
import torch
from click.testing import CliRunner

import ckptkit
from ckptkit import CheckpointManager
from ckptkit.cli import _register_commands, cli

from .helpers import flip_byte, make_training, tensors_equal, train_steps

CKPTKIT = shutil.which("ckptkit", path=os.path.dirname(sys.executable))


@pytest.fixture(scope="module", autouse=True)
def commands():
    _register_commands()


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def assert_clean_error(result, code: int, *words: str) -> None:
    """Exit ``code``, one ``Error:`` line on stderr naming ``words``, no traceback."""
    assert result.exit_code == code, (result.output, result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output + result.stderr
    for word in words:
        assert word in lines[0]


@pytest.fixture
def run(run_dir):
    state = make_training()
    train_steps(state, 2)
    with CheckpointManager(run_dir, keep_last=None, best_metric="val_loss") as mgr:
        for step, loss in ((100, 0.9), (200, 0.4), (300, 0.6)):
            mgr.save(step, {**state, "epoch": step // 100}, {"val_loss": loss})
    return run_dir


def _ckpt(run: str, step: int) -> str:
    return os.path.join(run, f"step-{step:012d}")


# -- inspect -------------------------------------------------------------------


def test_inspect_checkpoint_text(run):
    result = invoke("inspect", _ckpt(run, 200))
    assert result.exit_code == 0, result.output
    assert "(ckptkit, complete)" in result.output
    assert "step 200  epoch 2  val_loss=0.4" in result.output
    assert "model: 4 tensors, 58 values" in result.output
    assert "optimizer: state, param_groups" in result.output
    assert "saved with ckptkit" in result.output


def test_inspect_text_of_nested_state_named_like_a_summary(run_dir):
    """State whose keys look like inspect's own summary fields ("tensors", as
    TrainableOnly writes) is shown as a nested dict, not mistaken for a tensor summary."""
    model = torch.nn.Linear(2, 2)
    wrapped = {"format": "x/1", "tensors": model.state_dict(), "frozen": {"digest": "ab"}}
    with CheckpointManager(run_dir) as mgr:
        mgr.save(1, {"model": wrapped, "trainable": ckptkit.TrainableOnly(model)})
    result = invoke("inspect", run_dir)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "model: format, tensors, frozen" in result.output
    assert "trainable: format, tensors, frozen" in result.output


def test_inspect_run_json_is_its_latest(run):
    result = invoke("inspect", run, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["step"] == 300 and info["kind"] == "native"
    assert info["source"].endswith("step-000000000300")
    assert info["state"]["model"] == {"tensors": 4, "parameters": 58, "bytes": 232}
    assert info["metrics"] == {"val_loss": 0.6}
    assert {"model.safetensors", "optimizer.safetensors", "state.json"} <= set(info["files"])
    assert all(len(f["xxh3"]) == 32 for f in info["files"].values())
    assert info["versions"]["torch"] == torch.__version__


def test_inspect_refuses_a_damaged_checkpoint_unless_no_verify(run):
    flip_byte(os.path.join(_ckpt(run, 300), "model.safetensors"))
    assert_clean_error(invoke("inspect", _ckpt(run, 300)), 4, "xxh3")
    assert invoke("inspect", _ckpt(run, 300), "--no-verify").exit_code == 0


# -- ls ------------------------------------------------------------------------


def test_ls_marks_latest_and_best(run):
    result = invoke("ls", run)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()  # the note on what was checked is on stderr
    assert lines[0].split()[:2] == ["name", "step"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert list(rows) == [f"step-{s:012d}" for s in (100, 200, 300)]
    assert rows["step-000000000200"].endswith("best")
    assert rows["step-000000000300"].endswith("latest")
    assert "val_loss=0.9" in rows["step-000000000100"]


def test_ls_json(run):
    result = invoke("ls", run, "--json")
    rows = json.loads(result.output)
    assert [r["step"] for r in rows] == [100, 200, 300]
    assert [r["is_best"] for r in rows] == [False, True, False]
    assert [r["best"] for r in rows] == [False, True, False]
    assert [r["latest"] for r in rows] == [False, False, True]
    assert {r["status"] for r in rows} == {"complete"}
    assert all(r["size"] > 0 and r["files"] == 3 for r in rows)
    # ``path`` is accepted by inspect, verify, load and restore(which=...).
    for r in rows:
        assert json.loads(invoke("inspect", r["path"], "--json").output)["step"] == r["step"]
        assert invoke("verify", r["path"]).exit_code == 0
        assert ckptkit.load(r["path"])["model"]
    state = {"model": make_training(seed=5)["model"]}
    with CheckpointManager(run, readonly=True) as mgr:
        assert mgr.restore(state, which=rows[0]["path"]) == 100


def test_ls_lists_damaged_and_interrupted_checkpoints_with_their_status(run):
    with open(os.path.join(_ckpt(run, 300), "manifest.json"), "w") as f:
        f.write("{")
    os.makedirs(os.path.join(run, "step-000000000400"))  # an interrupted marker-style save
    with open(os.path.join(run, "step-000000000400", "state.pt"), "wb") as f:
        f.write(b"partial")
    result = invoke("ls", run)
    assert result.exit_code == 0, result.output
    rows = {ln.split()[0]: ln for ln in result.stdout.strip().splitlines()[1:]}
    assert rows["step-000000000300"].endswith("CORRUPT")
    assert rows["step-000000000400"].endswith("INCOMPLETE")
    assert rows["step-000000000200"].endswith("latest best")  # the newest complete one
    assert "Traceback" not in result.output

    listed = json.loads(invoke("ls", run, "--json").output)
    status = {r["step"]: r["status"] for r in listed}
    assert status == {100: "complete", 200: "complete", 300: "corrupt", 400: "incomplete"}
    assert [r["latest"] for r in listed] == [False, True, False, False]
    assert all(r["problem"] for r in listed if r["status"] != "complete")


def test_ls_of_an_empty_or_missing_run(tmp_path):
    assert_clean_error(invoke("ls", str(tmp_path / "nope")), 3, "no checkpoints")
    result = invoke("ls", str(tmp_path), "--json")
    assert result.exit_code == 0 and json.loads(result.output) == []


# -- verify --------------------------------------------------------------------


def test_verify_good_run_and_checkpoint(run):
    result = invoke("verify", run)
    assert result.exit_code == 0, result.output
    assert result.output.count("OK") == 3
    assert invoke("verify", _ckpt(run, 100)).exit_code == 0


def test_verify_reports_corrupt_and_incomplete_checkpoints(run):
    flip_byte(os.path.join(_ckpt(run, 200), "state.json"))
    os.remove(os.path.join(_ckpt(run, 300), "manifest.json"))
    result = invoke("verify", run, "--json")
    assert result.exit_code == 4
    report = json.loads(result.output)
    assert report["ok"] is False
    by_step = {os.path.basename(c["url"]): c for c in report["checkpoints"]}
    assert by_step["step-000000000100"]["ok"] is True
    assert "state.json: xxh3 does not match" in by_step["step-000000000200"]["problem"]
    assert "no manifest" in by_step["step-000000000300"]["problem"]
    text = invoke("verify", run)
    assert text.exit_code == 4
    assert "CORRUPT" in text.output and "Traceback" not in text.output


def test_verify_missing_path(tmp_path):
    assert_clean_error(invoke("verify", str(tmp_path / "nope")), 3, "no such file")


# -- convert -------------------------------------------------------------------


def test_convert_native_checkpoint_into_a_new_run(run, tmp_path):
    dst = str(tmp_path / "converted")
    result = invoke("convert", _ckpt(run, 200), dst)
    assert result.exit_code == 0, result.output
    assert "-> " in result.output and "step-000000000200" in result.output
    original = make_training()
    with CheckpointManager(run, readonly=True) as mgr:
        mgr.restore(original, 200)
    restored = make_training(seed=5)
    with CheckpointManager(dst) as mgr:
        assert mgr.restore(restored) == 200
    for key in ("model", "optimizer", "scheduler"):
        assert tensors_equal(original[key].state_dict(), restored[key].state_dict())


def test_convert_bare_state_dict_with_step(tmp_path):
    model = make_training()["model"]
    src = tmp_path / "checkpoint.pth"
    torch.save(model.state_dict(), src)
    dst = str(tmp_path / "run")
    result = invoke("convert", str(src), dst, "--step", "7")
    assert result.exit_code == 0, result.output
    assert "note:" in result.output  # says what a bare state_dict lacks
    target = make_training(seed=3)["model"]
    with CheckpointManager(dst) as mgr:
        assert mgr.restore({"model": target}) == 7
    assert tensors_equal(model.state_dict(), target.state_dict())


def test_convert_bad_input(run, tmp_path):
    assert_clean_error(invoke("convert", str(tmp_path / "nope"), str(tmp_path / "d")), 3, "nope")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    result = invoke("convert", str(junk), str(tmp_path / "d"))
    assert result.exit_code != 0 and "Traceback" not in result.output + result.stderr
    with CheckpointManager(str(tmp_path / "busy")):
        result = invoke("convert", _ckpt(run, 100), str(tmp_path / "busy"))
        assert_clean_error(result, 8, "this process already holds", "close() it")


# -- help ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["inspect", "ls", "verify", "convert"])
def test_help_explains_every_option(name):
    result = invoke(name, "--help")
    assert result.exit_code == 0
    command = cli.commands[name]
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help and len(param.help) > 10, f"{name} {param.opts} has no help"
            assert param.opts[-1] in result.output
        else:
            assert param.name.upper() in result.output  # arguments explained in the text


@pytest.mark.parametrize("name", ["inspect", "ls", "verify"])
def test_listing_commands_have_json(name):
    assert "--json" in invoke(name, "--help").output


def test_usage_errors_are_clean():
    result = invoke("inspect")
    assert result.exit_code == 2 and "Missing argument 'PATH'" in result.stderr
    result = invoke("frobnicate")
    assert result.exit_code == 2 and "No such command" in result.stderr


# -- the real console script ---------------------------------------------------

needs_script = pytest.mark.skipif(CKPTKIT is None, reason="ckptkit console script not installed")


@needs_script
@pytest.mark.slow
def test_console_script_exit_codes_and_one_line_messages(run, tmp_path):
    flip_byte(os.path.join(_ckpt(run, 300), "model.safetensors"))
    runs = {  # started together: each pays for importing torch
        "missing": ["inspect", str(tmp_path / "nope")],
        "verify": ["verify", run],
        "inspect": ["inspect", run, "--json"],
    }
    procs = {
        key: subprocess.Popen(
            [CKPTKIT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for key, args in runs.items()
    }
    out = {key: (*p.communicate(timeout=120), p.returncode) for key, p in procs.items()}
    out = {key: (code, stdout, stderr) for key, (stdout, stderr, code) in out.items()}
    for _, stdout, stderr in out.values():
        assert "Traceback" not in stdout + stderr

    code, _, stderr = out["missing"]
    assert code == 3
    assert stderr.strip().splitlines() == [f"Error: {tmp_path / 'nope'}: no such file or directory"]

    code, stdout, _ = out["verify"]
    assert code == 4 and "CORRUPT" in stdout and stdout.count("OK") == 2

    code, stdout, stderr = out["inspect"]
    assert code == 0, stderr
    assert json.loads(stdout)["step"] == 200  # the damaged latest is skipped
    assert stderr.strip().splitlines() == [
        f"Warning: skipping {_ckpt(run, 300)}/model.safetensors: xxh3 does not match "
        "the manifest (damaged)"
    ]


def test_inspect_json_contract(run, tmp_path):
    info = json.loads(invoke("inspect", _ckpt(run, 200), "--json").output)
    assert (info["format"], info["step"], info["complete"]) == ("ckptkit", 200, True)
    assert info["tensors"] > 4 and info["bytes"] > 0 and "float32" in info["dtypes"]
    assert any("RNG" in gap for gap in info["lacks"])  # the fixture saves no RNGState

    bare = tmp_path / "checkpoint"
    torch.save(make_training()["model"].state_dict(), bare)
    legacy = json.loads(invoke("inspect", str(bare), "--json").output)
    assert (legacy["format"], legacy["step"], legacy["complete"]) == ("state_dict", None, True)
    assert any("optimizer" in gap for gap in legacy["lacks"])

    flip_byte(os.path.join(_ckpt(run, 300), "model.safetensors"))
    damaged = invoke("inspect", _ckpt(run, 300), "--json")
    assert damaged.exit_code == 4
    report = json.loads(damaged.stdout)
    assert (report["format"], report["step"], report["complete"]) == ("ckptkit", 300, False)
    assert "xxh3" in report["problem"]


class _Exploit:
    """Unpickling this would run a shell command: the CLI must refuse, never run it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("command", ["inspect", "verify", "convert"])
def test_malicious_pickle_is_refused_by_the_cli_and_never_executed(tmp_path, command):
    marker = tmp_path / "pwned"
    legacy = tmp_path / "checkpoint.pt"
    torch.save({"model": make_training()["model"].state_dict(), "x": _Exploit(str(marker))}, legacy)
    args = [command, str(legacy)] + ([str(tmp_path / "out")] if command == "convert" else [])
    assert_clean_error(invoke(*args), 5, "system", "--trust")
    assert not marker.exists()
