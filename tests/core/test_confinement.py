"""Confinement: a checkpoint reads, trusts and deletes only what lies inside it.

Every case plants something hostile inside a run (a symlink to a secret outside it, a
FIFO, /dev/zero, a directory where a file should be, ``..`` names in a manifest or an HF
shard index) and checks that every reader refuses it as corrupt, never hangs, never
reveals the outside file's size or content, and that rotation and run-file writes never
touch anything outside the run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from xxhash import xxh3_128_hexdigest

import ckptkit
from ckptkit import CheckpointManager
from ckptkit.cli import _register_commands, cli
from ckptkit.errors import CheckpointNotFoundError, CorruptCheckpointError, StorageError
from ckptkit.manifest import MANIFEST
from ckptkit.reader import read_checkpoint

from .helpers import make_training, tensors_equal, train_steps

SECRET = b"TOP-SECRET-" * 97  # 1067 bytes: neither the text nor the size may leak
SECRET_SIZE = str(len(SECRET))


@pytest.fixture(scope="module", autouse=True)
def commands():
    _register_commands()


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def ckpt(run: str, step: int) -> str:
    return os.path.join(run, f"step-{step:012d}")


@pytest.fixture
def secret(tmp_path) -> str:
    path = tmp_path / "outside" / "secret.bin"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return str(path)


@pytest.fixture
def run(run_dir):
    """A run with two checkpoints (steps 1 and 2) of a small model + optimizer."""
    state = make_training()
    with CheckpointManager(run_dir, keep_last=None) as mgr:
        for step in (1, 2):
            train_steps(state, 1)
            mgr.save(step, state)
    return run_dir


def plant_link(run: str, step: int, member: str, target: str) -> str:
    """Replace ``member`` of checkpoint ``step`` by a symlink to ``target``."""
    path = os.path.join(ckpt(run, step), member)
    os.unlink(path)
    os.symlink(target, path)
    return path


def copy_outside(run: str, step: int, member: str, tmp_path) -> str:
    """A byte-identical copy of a member, outside the run (so sizes and hashes match)."""
    dst = tmp_path / "outside-copy" / member
    dst.parent.mkdir(exist_ok=True)
    shutil.copyfile(os.path.join(ckpt(run, step), member), dst)
    return str(dst)


def assert_refused_everywhere(run: str, step: int, *, leak: tuple[str, ...] = ()) -> None:
    """Every reader treats checkpoint ``step`` as corrupt and falls back to step 1."""
    fresh = make_training(seed=7)
    with CheckpointManager(run, readonly=True) as mgr:
        with pytest.warns(UserWarning, match=f"step-{step:012d}"):
            latest = mgr.latest()
        assert latest is not None and latest.step == 1
        with pytest.warns(UserWarning):
            assert mgr.restore(fresh) == 1
        with pytest.raises((CorruptCheckpointError, CheckpointNotFoundError)):
            mgr.restore(make_training(), step)
        with pytest.raises((CorruptCheckpointError, CheckpointNotFoundError)):
            mgr.restore(make_training(), step, verify=False)
    with pytest.warns(UserWarning):
        assert read_checkpoint(run).step == 1
    with pytest.raises(CorruptCheckpointError):
        ckptkit.load(ckpt(run, step))
    with pytest.raises(CorruptCheckpointError):
        ckptkit.load(ckpt(run, step), verify=False)

    outputs = []
    result = invoke("ls", "--json", run)
    assert result.exit_code == 0, result.output
    rows = {r["step"]: r for r in json.loads(result.stdout)}
    assert rows[step]["status"] != "complete" and not rows[step]["latest"]
    assert rows[1]["latest"]
    outputs.append(result.output)
    for args, code in (
        (("verify", run), None),
        (("verify", ckpt(run, step)), None),
        (("inspect", ckpt(run, step)), 4),
        (("inspect", "--json", ckpt(run, step)), 4),
        (("inspect", "--no-verify", ckpt(run, step)), 4),
    ):
        result = invoke(*args)
        assert result.exit_code != 0 if code is None else result.exit_code == code, (
            args,
            result.output,
        )
        assert "Traceback" not in result.output
        outputs.append(result.output)
    text = "\n".join(outputs)
    assert "TOP-SECRET" not in text
    for word in leak:
        assert word not in text


# -- symlinked members and directories ---------------------------------------------
@pytest.mark.parametrize("member", ["state.json", "model.safetensors", MANIFEST])
def test_symlink_to_identical_outside_copy_is_corrupt(run, tmp_path, member):
    # The outside file has the very bytes the manifest records: only confinement catches it.
    plant_link(run, 2, member, copy_outside(run, 2, member, tmp_path))
    assert_refused_everywhere(run, 2)


def test_symlink_to_secret_never_reveals_it(run, secret):
    plant_link(run, 2, "state.json", secret)
    assert_refused_everywhere(run, 2, leak=(SECRET_SIZE,))
    assert Path(secret).read_bytes() == SECRET


def test_symlinked_checkpoint_directory_is_corrupt(run, tmp_path):
    outside = tmp_path / "elsewhere" / "step-000000000002"
    outside.parent.mkdir()
    shutil.move(ckpt(run, 2), outside)
    os.symlink(outside, ckpt(run, 2))
    assert_refused_everywhere(run, 2)
    assert sorted(os.listdir(outside)) == [
        "manifest.json",
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]


@pytest.mark.timeout(60)
def test_fifo_member_never_hangs(run):
    path = os.path.join(ckpt(run, 2), "state.json")
    os.unlink(path)
    os.mkfifo(path)
    assert_refused_everywhere(run, 2)


def test_member_replaced_by_directory_is_corrupt(run):
    path = os.path.join(ckpt(run, 2), "state.json")
    os.unlink(path)
    os.mkdir(path)
    assert_refused_everywhere(run, 2)


def _limited(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with at most 3 GiB of address space, so that a
    reader that reads /dev/zero to the end dies quickly instead of exhausting the machine."""
    prelude = "import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_dev_zero_member_is_bounded(run):
    plant_link(run, 2, "state.json", "/dev/zero")
    proc = _limited(
        f"""
        import ckptkit
        from ckptkit.errors import CorruptCheckpointError
        for verify in (True, False):
            try:
                ckptkit.load({ckpt(run, 2)!r}, verify=verify)
            except CorruptCheckpointError as exc:
                print("refused:", exc)
        """
    )
    assert proc.returncode == 0 and proc.stdout.count("refused:") == 2, proc.stderr[-2000:]


@pytest.mark.parametrize(
    "name",
    [
        "../outside.safetensors",
        "sub/../../outside.safetensors",
        "sub/inside.safetensors",  # a sub-folder file, but named by an entry: refused
        "./inside.safetensors",
    ],
)
def test_manifest_names_outside_the_checkpoint_are_refused(run, tmp_path, name):
    """A hand-edited manifest that lists a file outside the checkpoint (hash and all)."""
    model = make_training(seed=3)["model"]
    os.mkdir(os.path.join(ckpt(run, 2), "sub"))  # so that the OS resolves sub/.. at all
    data_path = os.path.normpath(os.path.join(ckpt(run, 2), name))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, data_path)
    data = Path(data_path).read_bytes()
    manifest_path = os.path.join(ckpt(run, 2), MANIFEST)
    raw = json.loads(Path(manifest_path).read_text())
    raw["files"].pop("model.safetensors")
    raw["files"][name] = {"size": len(data), "xxh3": xxh3_128_hexdigest(data)}
    raw["entries"]["model"] = name
    Path(manifest_path).write_text(json.dumps(raw))
    os.unlink(os.path.join(ckpt(run, 2), "model.safetensors"))
    assert_refused_everywhere(run, 2)


def test_entry_naming_an_unlisted_file_is_refused(run):
    manifest_path = os.path.join(ckpt(run, 2), MANIFEST)
    raw = json.loads(Path(manifest_path).read_text())
    raw["entries"]["model"] = "other.safetensors"
    Path(manifest_path).write_text(json.dumps(raw))
    shutil.copyfile(
        os.path.join(ckpt(run, 2), "model.safetensors"),
        os.path.join(ckpt(run, 2), "other.safetensors"),
    )
    refused = pytest.raises((CorruptCheckpointError, CheckpointNotFoundError))
    with CheckpointManager(run, readonly=True) as mgr, refused:
        mgr.restore(make_training(), 2, verify=False)
    with pytest.raises((CorruptCheckpointError, CheckpointNotFoundError)):
        ckptkit.load(ckpt(run, 2), verify=False)


def test_run_root_may_be_a_symlink(tmp_path):
    """A run kept on a bigger disk behind a symlink works like any other."""
    real = tmp_path / "bigdisk" / "run"
    real.mkdir(parents=True)
    link = str(tmp_path / "run")
    os.symlink(real, link)
    state = make_training()
    with CheckpointManager(link, keep_last=2) as mgr:
        for step in (1, 2, 3):
            train_steps(state, 1)
            mgr.save(step, state, {"loss": 1.0 / step})
    fresh = make_training(seed=9)
    with CheckpointManager(link) as mgr:
        assert [c.step for c in mgr.list()] == [2, 3]
        assert mgr.restore(fresh) == 3
    assert tensors_equal(fresh["model"].state_dict(), state["model"].state_dict())
    assert invoke("verify", link).exit_code == 0
    assert invoke("inspect", ckpt(link, 3)).exit_code == 0
    assert json.loads(invoke("ls", "--json", link).stdout)[-1]["latest"]
    assert ckptkit.load(link)["model"].keys() == state["model"].state_dict().keys()


# -- rotation and cleanup -------------------------------------------------------
def test_rotation_removes_a_member_link_not_its_target(run, secret):
    plant_link(run, 1, "state.json", secret)
    state = make_training()
    with CheckpointManager(run, keep_last=1, keep_best=0) as mgr:
        mgr.save(3, state)
    assert not os.path.exists(ckpt(run, 1)) and not os.path.lexists(ckpt(run, 1))
    assert Path(secret).read_bytes() == SECRET


def test_rotation_never_deletes_through_a_symlinked_checkpoint(run, tmp_path):
    outside = tmp_path / "elsewhere" / "step-000000000001"
    outside.parent.mkdir()
    shutil.move(ckpt(run, 1), outside)
    os.symlink(outside, ckpt(run, 1))
    before = sorted(os.listdir(outside))
    state = make_training()
    with CheckpointManager(run, keep_last=1, keep_best=0) as mgr:
        mgr.save(3, state)
        mgr.save(4, state)
    assert sorted(os.listdir(outside)) == before


def test_rotation_never_descends_into_a_linked_folder(run, tmp_path):
    outside = tmp_path / "elsewhere" / "data"
    outside.mkdir(parents=True)
    (outside / "keep.txt").write_text("keep")
    os.symlink(outside, os.path.join(ckpt(run, 1), "extra"))  # unlisted: never read
    with CheckpointManager(run, keep_last=1, keep_best=0) as mgr:
        mgr.save(3, make_training())
    assert not os.path.lexists(ckpt(run, 1))
    assert (outside / "keep.txt").read_text() == "keep"


def test_leftover_symlink_is_unlinked_not_followed(run, tmp_path):
    outside = tmp_path / "elsewhere" / "data"
    outside.mkdir(parents=True)
    (outside / "keep.txt").write_text("keep")
    os.symlink(outside, ckpt(run, 9))  # named like a checkpoint, no manifest: a leftover
    os.symlink(outside, os.path.join(run, ".tmp-step-000000000009-deadbeef"))
    with CheckpointManager(run):
        pass
    assert (outside / "keep.txt").read_text() == "keep"


# -- run files ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["run.json", "metrics.jsonl", "train.log"])
def test_run_files_are_never_written_through_a_symlink(run_dir, secret, name):
    os.makedirs(run_dir)
    os.symlink(secret, os.path.join(run_dir, name))
    with CheckpointManager(run_dir) as mgr:
        mgr.save(1, make_training())
        mgr.write_file(name, '{"run_name": "mine"}\n')
    assert Path(secret).read_bytes() == SECRET
    assert not os.path.islink(os.path.join(run_dir, name))


def test_lock_symlink_is_replaced_not_followed(run_dir, tmp_path, secret):
    os.makedirs(run_dir)
    os.symlink(tmp_path / "nowhere", os.path.join(run_dir, ".lock"))
    with CheckpointManager(run_dir) as mgr:
        mgr.save(1, make_training())
    assert not os.path.lexists(tmp_path / "nowhere")
    os.symlink(secret, os.path.join(run_dir, ".lock"))
    with CheckpointManager(run_dir) as mgr:
        mgr.save(2, make_training())
    assert Path(secret).read_bytes() == SECRET


@pytest.mark.parametrize("name", ["../escape.txt", "sub/../../escape.txt", "/tmp/escape.txt"])
def test_run_file_names_stay_inside_the_run(run_dir, tmp_path, name):
    with CheckpointManager(run_dir) as mgr, pytest.raises(StorageError):
        mgr.write_file(name, "x")
    assert not (tmp_path / "escape.txt").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", [".lock", "run.json"])
def test_fifo_run_file_never_hangs(run_dir, name):
    os.makedirs(run_dir)
    os.mkfifo(os.path.join(run_dir, name))
    with CheckpointManager(run_dir) as mgr:
        mgr.save(1, make_training())
    with CheckpointManager(run_dir, readonly=True) as mgr:
        assert mgr.latest().step == 1


def test_symlinked_run_json_is_not_trusted(run_dir, tmp_path):
    outside = tmp_path / "other.json"
    outside.write_text(json.dumps({"run_name": "someone-else"}))
    os.makedirs(run_dir)
    os.symlink(outside, os.path.join(run_dir, "run.json"))
    with pytest.warns(UserWarning, match="run.json"):
        mgr = CheckpointManager(run_dir, run_name="mine")
    with mgr:
        assert mgr.run_name == "mine"
        mgr.save(1, make_training())
    assert json.loads(outside.read_text()) == {"run_name": "someone-else"}


# -- foreign layouts ---------------------------------------------------------------
def _tensor_file(path, seed: int = 0) -> bytes:
    torch.manual_seed(seed)
    save_file({"w": torch.randn(3, 3)}, str(path))
    return Path(path).read_bytes()


def _hf_dir(tmp_path, weight_map: dict) -> str:
    d = tmp_path / "hf" / "checkpoint-10"
    d.mkdir(parents=True)
    _tensor_file(d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (d / "trainer_state.json").write_text(json.dumps({"global_step": 10, "epoch": 1.0}))
    return str(d)


def test_hf_index_regular_shard_reads(tmp_path):
    d = _hf_dir(tmp_path, {"w": "model-00001-of-00001.safetensors"})
    assert ckptkit.load(d)["model"]["w"].shape == (3, 3)


_HF_NAMES = [
    pytest.param("../secret.safetensors", id="dotdot"),
    pytest.param("a/../../secret.safetensors", id="nested-dotdot"),
    pytest.param("/abs/secret.safetensors", id="absolute"),
    pytest.param("..\\secret.safetensors", id="backslash"),
    pytest.param("./model-00001-of-00001.safetensors", id="dot-component"),
    pytest.param("", id="empty"),
    pytest.param("model-00001-of-00001.safetensors\x00", id="nul"),
    pytest.param(["model-00001-of-00001.safetensors"], id="not-a-string"),
]


@pytest.mark.parametrize("shard", _HF_NAMES)
def test_hf_index_names_outside_the_checkpoint_are_refused(tmp_path, shard):
    d = _hf_dir(tmp_path, {"w": "model-00001-of-00001.safetensors", "v": shard})
    _tensor_file(tmp_path / "hf" / "secret.safetensors", seed=5)
    with pytest.raises(CorruptCheckpointError):
        ckptkit.load(d)
    result = invoke("inspect", d)
    assert result.exit_code == 4 and "Traceback" not in result.output, result.output


@pytest.mark.parametrize(
    "member",
    ["model-00001-of-00001.safetensors", "trainer_state.json", "model.safetensors.index.json"],
)
def test_hf_symlinked_member_is_refused(tmp_path, member):
    d = _hf_dir(tmp_path, {"w": "model-00001-of-00001.safetensors"})
    outside = tmp_path / "outside" / member
    outside.parent.mkdir()
    shutil.move(os.path.join(d, member), outside)
    os.symlink(outside, os.path.join(d, member))
    with pytest.raises(CorruptCheckpointError):
        ckptkit.load(d)
    result = invoke("inspect", "--json", d)
    assert result.exit_code == 4, result.output


def test_legacy_directory_member_symlink_is_refused(tmp_path):
    outside = tmp_path / "outside.pt"
    torch.save({"w": torch.ones(2)}, outside)
    d = tmp_path / "legacy"
    d.mkdir()
    os.symlink(outside, d / "checkpoint.pt")
    with pytest.raises(CorruptCheckpointError):
        ckptkit.load(str(d))


def test_legacy_file_given_directly_may_be_a_symlink(tmp_path):
    real = tmp_path / "real.pt"
    torch.save({"w": torch.ones(2)}, real)
    os.symlink(real, tmp_path / "link.pt")
    assert torch.equal(ckptkit.load(str(tmp_path / "link.pt"))["model"]["w"], torch.ones(2))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["fifo", "link-to-fifo"])
def test_legacy_fifo_is_refused_at_once(tmp_path, how):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    target = fifo
    if how == "link-to-fifo":
        target = tmp_path / "link.pt"
        os.symlink(fifo, target)
    with pytest.raises(CorruptCheckpointError):
        ckptkit.load(str(target))
    result = invoke("inspect", str(target))
    assert result.exit_code == 4, result.output


def test_legacy_dev_zero_is_refused(tmp_path):
    os.symlink("/dev/zero", tmp_path / "zero.pt")
    proc = _limited(
        f"""
        import ckptkit
        from ckptkit.errors import CorruptCheckpointError
        for path in ("/dev/zero", {str(tmp_path / "zero.pt")!r}):
            try:
                ckptkit.load(path)
            except CorruptCheckpointError as exc:
                print("refused:", exc)
        """
    )
    assert proc.returncode == 0 and proc.stdout.count("refused:") == 2, proc.stderr[-2000:]


@pytest.mark.timeout(60)
def test_legacy_step_dir_that_is_a_link_is_skipped(tmp_path):
    out = tmp_path / "out"
    for n in (1, 2):
        (out / f"checkpoint_step_{n}").mkdir(parents=True)
        torch.save(
            {"model": {"w": torch.full((2,), float(n))}, "global_step": n},
            out / f"checkpoint_step_{n}" / "checkpoint.pt",
        )
    elsewhere = tmp_path / "elsewhere"
    shutil.move(out / "checkpoint_step_2", elsewhere)
    os.symlink(elsewhere, out / "checkpoint_step_2")
    with pytest.warns(UserWarning, match="checkpoint_step_2"):
        loaded = read_checkpoint(str(out))
    assert loaded.step == 1


def test_remote_member_larger_than_recorded_is_refused_without_its_size():
    import uuid

    import fsspec

    url = f"memory://ckptkit-confine-{uuid.uuid4().hex}/run"
    state = make_training()
    with CheckpointManager(url, keep_last=None) as mgr:
        mgr.save(1, state)
        mgr.save(2, state)
    fs = fsspec.filesystem("memory")
    key = url.removeprefix("memory://") + "/step-000000000002/state.json"
    fs.pipe_file(key, fs.cat_file(key) + SECRET)
    try:
        with CheckpointManager(url, readonly=True) as mgr:
            with pytest.warns(UserWarning) as caught:
                assert mgr.latest().step == 1
            with pytest.raises(CorruptCheckpointError) as err:
                mgr.restore(make_training(), 2, verify=False)
        text = str(err.value) + " ".join(str(w.message) for w in caught)
        assert "state.json" in text and str(fs.info(key)["size"]) not in text
    finally:
        fs.rm(url.removeprefix("memory://"), recursive=True)


# -- Drive ---------------------------------------------------------------------------
@pytest.fixture
def drive_run(tmp_path, monkeypatch):
    from ckptkit.storage.drive import ROOT_ENV, STAGING_ENV

    root = tmp_path / "MyDrive"
    root.mkdir()
    monkeypatch.setenv(ROOT_ENV, str(root))
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "staging"))
    state = make_training()
    with CheckpointManager("drive://T-L/run", keep_last=None) as mgr:
        for step in (1, 2):
            train_steps(state, 1)
            mgr.save(step, state)
    return "drive://T-L/run", str(root / "T-L" / "run")


def test_drive_symlinked_member_is_corrupt(drive_run, tmp_path):
    url, path = drive_run
    plant_link(path, 2, "state.json", copy_outside(path, 2, "state.json", tmp_path))
    with CheckpointManager(url, readonly=True) as mgr:
        with pytest.warns(UserWarning, match="step-000000000002"):
            assert mgr.latest().step == 1
        with pytest.raises(CorruptCheckpointError):
            mgr.restore(make_training(), 2)
        with pytest.warns(UserWarning):
            assert mgr.restore(make_training()) == 1


def test_drive_symlinked_checkpoint_directory_is_corrupt(drive_run, tmp_path):
    url, path = drive_run
    outside = tmp_path / "elsewhere"
    shutil.move(ckpt(path, 2), outside)
    os.symlink(outside, ckpt(path, 2))
    warned = pytest.warns(UserWarning, match="step-000000000002")
    with CheckpointManager(url, readonly=True) as mgr, warned:
        assert mgr.latest().step == 1
    with pytest.raises(CorruptCheckpointError):
        ckptkit.load(url + "/step-000000000002")
    assert sorted(os.listdir(outside)) == [
        "manifest.json",
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]


def test_drive_upload_never_writes_through_a_planted_link(tmp_path):
    """The uploader's copy onto the mount replaces a link (or FIFO) planted where a file
    lands, and never writes through it: the link's target stays untouched."""
    from ckptkit.storage import drive

    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"do not overwrite")
    src = tmp_path / "staged.bin"
    src.write_bytes(b"checkpoint bytes")
    on_drive = tmp_path / "MyDrive" / "run" / "step-000000000003"
    on_drive.mkdir(parents=True)
    link, fifo = on_drive / "state.json", on_drive / "model.safetensors"
    os.symlink(secret, link)
    os.mkfifo(fifo)
    for dst in (link, fifo):
        drive._copy_file(str(src), str(dst))
        assert not dst.is_symlink() and dst.read_bytes() == b"checkpoint bytes"
        assert drive._digest(str(dst))[0] == len(b"checkpoint bytes")
    assert secret.read_bytes() == b"do not overwrite"
    os.symlink(secret, on_drive / "manifest.json")
    with pytest.raises(OSError):
        drive._digest(str(on_drive / "manifest.json"))  # read-back never follows a link


def test_drive_upload_never_truncates_a_live_file(tmp_path, monkeypatch):
    """A replayed upload over a file already live on Drive (a manifest) goes to a fresh
    sibling and is renamed over it: a failure mid-copy leaves the old file whole."""
    from ckptkit.storage import drive

    live = tmp_path / "MyDrive" / "run" / "step-000000000003" / "manifest.json"
    live.parent.mkdir(parents=True)
    live.write_bytes(b'{"live": true}')
    src = tmp_path / "staged.json"
    src.write_bytes(b'{"replayed": true}')

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(drive.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        drive._copy_file(str(src), str(live))
    assert live.read_bytes() == b'{"live": true}'
    assert os.listdir(live.parent) == ["manifest.json"]  # no partial copy left behind
    monkeypatch.undo()
    drive._copy_file(str(src), str(live))
    assert live.read_bytes() == b'{"replayed": true}'
