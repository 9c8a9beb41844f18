"""Restore without copies (issue 10, item 3): a model's weights are copied once, from the
checkpoint file mapped under a read lease straight into the parameters, and a file that
someone truncates or rewrites meanwhile never kills the process with SIGBUS.

The dangerous cases run in a child process, so that a SIGBUS (the failure this guards
against) is a failed test rather than a crashed test run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import ckptkit

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux leases")

ROOT = Path(__file__).resolve().parents[2]


def _maps_here(folder: Path) -> bool:
    from ckptkit.storage import mapping

    probe = folder / "probe"
    probe.write_bytes(b"x" * 64)
    fd = os.open(probe, os.O_RDONLY)
    try:
        mapped = mapping.map_file(fd, 64, str(probe))
        return mapped is not None and mapped.close()
    finally:
        os.close(fd)
        probe.unlink()


@pytest.fixture
def tmp_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh folder on a filesystem that grants read leases: pytest's own (ext4 on
    these machines), else one in /dev/shm (tmpfs); the tests skip only where neither
    does (leases disabled), since then restore never maps and has nothing to prove."""
    base = tmp_path_factory.mktemp("mapped")
    if _maps_here(base):
        yield base
        return
    if Path("/dev/shm").is_dir():
        shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
        try:
            if _maps_here(shm):
                yield shm
                return
        finally:
            shutil.rmtree(shm, ignore_errors=True)
    pytest.skip("no filesystem here grants read leases (/proc/sys/fs/leases-enable?)")


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 64))


def _saved_run(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = _model(0)
    run = tmp_path / "run"
    with ckptkit.CheckpointManager(str(run)) as mgr:
        mgr.save(1, {"model": model})
    return run, model


def _model_file(run: Path) -> Path:
    (path,) = run.glob("step-*/model.safetensors")
    return path


def _child(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins")])}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_a_truncation_waits_until_the_mapped_file_is_released(tmp_path: Path) -> None:
    """The guarantee the zero-copy restore rests on: while a file is mapped, a truncate
    (here by another process, as `truncate -s 0` does it) waits; every mapped byte stays
    readable; once released, the truncate goes through."""
    from ckptkit.storage import mapping

    run, _ = _saved_run(tmp_path)
    path = _model_file(run)
    expected = path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    try:
        mapped = mapping.map_file(fd, len(expected), str(path))
        assert mapped is not None, "a local ext4/tmpfs file of ours should be mappable"
        cutter = subprocess.Popen(
            [sys.executable, "-c", f"import os; os.truncate({str(path)!r}, 0)"]
        )
        try:
            time.sleep(1.0)
            assert cutter.poll() is None, "the truncate did not wait for the lease"
            assert not mapped.intact(), "a pending break must be visible to the reader"
            assert mapped.view is not None and bytes(mapped.view) == expected  # no SIGBUS
        finally:
            assert mapped.close()
        assert cutter.wait(timeout=30) == 0
    finally:
        os.close(fd)
    assert path.stat().st_size == 0


def test_restored_weights_never_point_into_the_checkpoint_file(tmp_path: Path) -> None:
    """After restore the model owns its memory: truncating the checkpoint afterwards and
    training on does not crash (it would SIGBUS if a parameter still mapped the file)."""
    run, model = _saved_run(tmp_path)
    torch.save(model.state_dict(), tmp_path / "expected.pt")
    out = _child(
        f"""
        import os, glob, torch, ckptkit
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                    torch.nn.Linear(512, 64))
        with ckptkit.CheckpointManager({str(run)!r}) as mgr:
            assert mgr.restore({{"model": model}}).resumed
        for f in glob.glob({str(run)!r} + "/step-*/*"):
            os.truncate(f, 0)
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        for k, v in model.state_dict().items():
            assert torch.equal(v, expected[k]), k
        model(torch.randn(4, 256)).sum().backward()
        print("ok")
        """
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr[-2000:])


def test_a_module_that_keeps_the_given_tensor_gets_its_own_copy(tmp_path: Path) -> None:
    """A custom ``_load_from_state_dict`` that stores the tensor it is given (instead of
    copying it) would keep a view of the mapping: the restore gives it memory of its own."""
    out = _child(
        f"""
        import os, glob, torch, ckptkit

        class Keeper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("table", torch.zeros(1000))
            def _load_from_state_dict(self, sd, prefix, *args):
                self.table = sd[prefix + "table"]  # kept, not copied

        src = Keeper(); src.table = torch.arange(1000.0)
        with ckptkit.CheckpointManager({str(tmp_path / "run")!r}) as mgr:
            mgr.save(1, {{"model": src}})
        dst = Keeper()
        with ckptkit.CheckpointManager({str(tmp_path / "run")!r}) as mgr:
            mgr.restore({{"model": dst}})
        for f in glob.glob({str(tmp_path / "run")!r} + "/step-*/*"):
            os.truncate(f, 0)
        assert torch.equal(dst.table, torch.arange(1000.0))
        print("ok")
        """
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr[-2000:])


def test_restores_while_another_process_keeps_damaging_the_files(tmp_path: Path) -> None:
    """Adversarial: one process truncates and rewrites the checkpoint's files in a loop
    while another restores it over and over. The restorer never dies of a signal; each
    restore gives back exactly the saved weights or refuses with CorruptCheckpointError."""
    run, model = _saved_run(tmp_path)
    torch.save(model.state_dict(), tmp_path / "expected.pt")
    files = sorted(str(p) for p in run.glob("step-*/*") if p.name != "manifest.json")
    saved = {f: Path(f).read_bytes() for f in files}
    (tmp_path / "stop").unlink(missing_ok=True)
    vandal = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import os, time
                saved = {{f: open(f, "rb").read() for f in {files!r}}}
                while not os.path.exists({str(tmp_path / "stop")!r}):
                    for f, data in saved.items():
                        os.truncate(f, len(data) // 3)
                        time.sleep(0.002)
                        with open(f, "r+b") as fh:
                            fh.write(data)
                    time.sleep(0.001)
                """
            ),
        ]
    )
    try:
        out = _child(
            f"""
            import torch, ckptkit, warnings
            from ckptkit.errors import CorruptCheckpointError
            warnings.simplefilter("ignore")
            expected = torch.load({str(tmp_path / "expected.pt")!r})
            ok = refused = 0
            for i in range(60):
                model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                            torch.nn.Linear(512, 64))
                try:
                    with ckptkit.CheckpointManager({str(run)!r}, readonly=True) as mgr:
                        r = mgr.restore({{"model": model}}, 1)
                except CorruptCheckpointError:
                    refused += 1
                    continue
                assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
                ok += 1
            print(ok, refused)
            """,
            timeout=300,
        )
    finally:
        (tmp_path / "stop").touch()
        vandal.wait(timeout=60)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    ok, refused = map(int, out.stdout.split())
    assert ok + refused == 60
    for f, data in saved.items():  # the vandal restored every file: still the same run
        assert Path(f).read_bytes() == data


def test_a_file_open_for_writing_elsewhere_is_read_without_mapping(tmp_path: Path) -> None:
    """The kernel refuses a read lease while someone holds the file open for writing:
    restore then reads it with pread, and still gives back the exact weights."""
    from ckptkit.storage import mapping

    run, model = _saved_run(tmp_path)
    path = _model_file(run)
    holder = os.open(path, os.O_WRONLY)  # open for writing, never written
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            assert mapping.map_file(fd, path.stat().st_size, str(path)) is None
        finally:
            os.close(fd)
        fresh = _model(1)
        with ckptkit.CheckpointManager(str(run)) as mgr:
            assert mgr.restore({"model": fresh}).resumed
        for k, v in model.state_dict().items():
            assert torch.equal(v, fresh.state_dict()[k])
    finally:
        os.close(holder)


def test_a_damaged_mapped_file_is_refused_before_any_weight_changes(tmp_path: Path) -> None:
    """Verification covers every mapped byte before the first view is lent: a flipped
    byte in the model's file is refused and the target keeps its weights."""
    run, _ = _saved_run(tmp_path)
    path = _model_file(run)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    target = _model(7)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with ckptkit.CheckpointManager(str(run)) as mgr, pytest.raises(ckptkit.CorruptCheckpointError):
        mgr.restore({"model": target}, 1)
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("verify", [True, False])
def test_mapped_restore_is_exact_with_tied_weights_and_optimizer(
    tmp_path: Path, verify: bool
) -> None:
    """Tied weights stay tied, the optimizer (a fresh one: its state is cloned out of the
    mapping, never left a view) and the model restore bit for bit, verified or not."""
    torch.manual_seed(3)
    emb = torch.nn.Embedding(100, 32)
    head = torch.nn.Linear(32, 100, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    opt = torch.optim.AdamW(model.parameters())
    model["head"](model["emb"](torch.arange(10))).sum().backward()
    opt.step()
    with ckptkit.CheckpointManager(str(tmp_path / "run")) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
    torch.manual_seed(4)
    emb2, head2 = torch.nn.Embedding(100, 32), torch.nn.Linear(32, 100, bias=False)
    head2.weight = emb2.weight
    model2 = torch.nn.ModuleDict({"emb": emb2, "head": head2})
    opt2 = torch.optim.AdamW(model2.parameters())
    with ckptkit.CheckpointManager(str(tmp_path / "run")) as mgr:
        mgr.restore({"model": model2, "optimizer": opt2}, verify=verify)
    assert model2["head"].weight is model2["emb"].weight
    assert torch.equal(model2["emb"].weight, model["emb"].weight)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i][k], s2[i][k]) for i in s1 for k in s1[i])


def test_a_write_attempt_during_restore_stops_it_before_the_model_touches_the_file(
    tmp_path: Path,
) -> None:
    """User code that runs during a restore (here another object's load_state_dict, in
    the same thread) tries to open the model's file for writing: the model must not copy
    from pages that may be gone once the kernel lets the writer through. The restore is
    refused with a CorruptCheckpointError naming the cause; the model keeps its weights;
    the next restore succeeds."""
    run = tmp_path / "run"
    model = _model(0)

    class Meddler:
        armed = False

        def state_dict(self) -> dict[str, int]:
            return {"n": 1}

        def load_state_dict(self, sd: dict[str, int]) -> None:
            if Meddler.armed:
                Meddler.armed = False
                # Non-blocking: starts the lease break and returns at once.
                with contextlib.suppress(BlockingIOError):
                    os.close(os.open(_model_file(run), os.O_WRONLY | os.O_NONBLOCK))

    with ckptkit.CheckpointManager(str(run)) as mgr:
        mgr.save(1, {"meddler": Meddler(), "model": model})
    target = _model(5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    Meddler.armed = True
    with ckptkit.CheckpointManager(str(run)) as mgr:
        with pytest.raises(ckptkit.CorruptCheckpointError, match="opened for writing"):
            mgr.restore({"meddler": Meddler(), "model": target})
        assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
        assert mgr.restore({"meddler": Meddler(), "model": target}).resumed
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in target.state_dict().items())


def test_only_local_disk_filesystems_are_mapped(tmp_path: Path) -> None:
    """A file on a filesystem whose files can change behind the kernel's back (here
    procfs, standing in for FUSE/NFS, which tests cannot mount) is never mapped."""
    from ckptkit.storage import mapping

    fd = os.open("/proc/self/status", os.O_RDONLY)
    try:
        assert not mapping.mappable_here(fd)
        assert mapping.map_file(fd, 100, "/proc/self/status") is None
    finally:
        os.close(fd)


def _trained(seed: int, steps: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = _model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for i in range(steps):
        torch.manual_seed(seed * 100 + i)
        model(torch.randn(8, 256)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("target_steps", [0, 1], ids=["fresh optimizer", "optimizer with state"])
def test_restored_optimizer_state_never_points_into_the_checkpoint_file(
    tmp_path: Path, target_steps: int
) -> None:
    """The optimizer keeps the tensors it loads: they are copied into its own state
    tensors (one that has them) or cloned (a fresh one), never views of the mapping.
    Truncating every checkpoint file after restore, then stepping, does not crash (it
    would SIGBUS otherwise), and the step is the one the original run takes."""
    model, opt = _trained(0, 2)
    run = tmp_path / "run"
    with ckptkit.CheckpointManager(str(run)) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
    torch.manual_seed(42)
    model(torch.randn(8, 256)).square().mean().backward()
    opt.step()  # what the resumed run must do next
    torch.save(model.state_dict(), tmp_path / "expected.pt")
    out = _child(
        f"""
        import os, glob, torch, ckptkit
        from tests.core.test_restore_mapped import _trained
        model, opt = _trained(5, {target_steps})
        with ckptkit.CheckpointManager({str(run)!r}) as mgr:
            assert mgr.restore({{"model": model, "optimizer": opt}}).resumed
        for f in glob.glob({str(run)!r} + "/step-*/*"):
            os.truncate(f, 0)
        torch.manual_seed(42)
        model(torch.randn(8, 256)).square().mean().backward()
        opt.step()
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        for k, v in model.state_dict().items():
            assert torch.equal(v, expected[k]), k
        print("ok")
        """
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr[-2000:])


def test_an_optimizer_with_state_gets_its_own_tensors_back_filled(tmp_path: Path) -> None:
    """No new memory for an optimizer's state when it has tensors of the saved shapes:
    the restored moments are in the very tensors it held (each copied once, from the
    mapped file), equal to the saved ones."""
    model, opt = _trained(0, 2)
    with ckptkit.CheckpointManager(str(tmp_path / "run")) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
    model2, opt2 = _trained(9, 1)
    before = {
        (i, k): v.data_ptr() for i, st in opt2.state_dict()["state"].items() for k, v in st.items()
    }
    with ckptkit.CheckpointManager(str(tmp_path / "run")) as mgr:
        mgr.restore({"model": model2, "optimizer": opt2})
    saved, got = opt.state_dict()["state"], opt2.state_dict()["state"]
    for i, st in saved.items():
        for k, v in st.items():
            assert torch.equal(got[i][k], v), (i, k)
            assert got[i][k].data_ptr() == before[(i, k)], f"{(i, k)}: new memory"


def test_a_damaged_optimizer_file_leaves_the_optimizer_as_it_was(tmp_path: Path) -> None:
    """The in-place copy into the optimizer's tensors happens only after every byte of
    the file was verified: a flipped byte is refused, and its state is untouched."""
    model, opt = _trained(0, 2)
    run = tmp_path / "run"
    with ckptkit.CheckpointManager(str(run)) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
    (path,) = run.glob("step-*/optimizer.safetensors")
    data = bytearray(path.read_bytes())
    data[-7] ^= 0xFF
    path.write_bytes(bytes(data))
    model2, opt2 = _trained(9, 1)
    before = {
        (i, k): v.clone() for i, st in opt2.state_dict()["state"].items() for k, v in st.items()
    }
    with ckptkit.CheckpointManager(str(run)) as mgr, pytest.raises(ckptkit.CorruptCheckpointError):
        mgr.restore({"model": model2, "optimizer": opt2}, 1)
    for (i, k), v in before.items():
        assert torch.equal(opt2.state_dict()["state"][i][k], v), (i, k)
