"""Bounded failure on gs://: a dead, unreachable or silent endpoint is a one-line
``StorageError`` within the configured time, never a hang or a traceback.

Three endpoints: a port nobody listens on (connection refused), a server that accepts
connections and never answers, and the real emulator killed (or gone silent) in the
middle of an upload. Timeouts are set small (``FAST``) and each failure must come well
within ``BOUND``; the defaults themselves are checked against the documented limits.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from ckptkit import CheckpointManager, StorageError
from ckptkit.cli import _register_commands, cli
from tests.gcs_emulator import (
    Emulator,
    FaultProxy,
    SilentServer,
    emulator_installed,
    refused_port,
)

pytestmark = [
    pytest.mark.gcs,
    pytest.mark.timeout(90),
    pytest.mark.skipif(not emulator_installed(), reason="gcp-storage-emulator is not installed"),
]

FAST = "3"  # seconds: CKPTKIT_REMOTE_TIMEOUT and CKPTKIT_REMOTE_WRITE_TIMEOUT in these tests
BOUND = 30.0  # a failure must be reported well within this
CKPTKIT = shutil.which("ckptkit", path=os.path.dirname(sys.executable))
BUCKET = f"fault-{uuid.uuid4().hex[:8]}"
NOISE = ("Traceback", "Unclosed", "aiohttp", "Task exception", "out of retries")


@pytest.fixture(scope="module", autouse=True)
def commands() -> None:
    _register_commands()


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CKPTKIT_REMOTE_TIMEOUT", FAST)
    monkeypatch.setenv("CKPTKIT_REMOTE_WRITE_TIMEOUT", FAST)
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


@pytest.fixture(params=["refused", "silent"])
def dead_endpoint(
    request: pytest.FixtureRequest, fast: None, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """STORAGE_EMULATOR_HOST pointing at an endpoint that refuses, or never answers."""
    if request.param == "refused":
        host = f"http://127.0.0.1:{refused_port()}"
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", host)
        yield host
    else:
        with SilentServer(lifetime=2 * BOUND) as server:
            monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.host)
            yield server.host


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.monotonic()
    out = fn()
    return out, time.monotonic() - start


def assert_one_line_error(result: Any, *words: str) -> None:
    assert result.exit_code == StorageError.exit_code, (result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for noise in NOISE:
        assert noise not in result.output, result.output
    for word in words:
        assert word in lines[0], lines[0]


# == defaults ======================================================================
def test_default_limits_are_the_documented_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptkit.storage.fsspec_backend import FsspecStorage

    monkeypatch.delenv("CKPTKIT_REMOTE_TIMEOUT", raising=False)
    monkeypatch.delenv("CKPTKIT_REMOTE_WRITE_TIMEOUT", raising=False)
    st = FsspecStorage("gs://some-bucket/run", token="anon")
    assert 0 < st.timeouts.timeout <= 60
    assert 0 < st.timeouts.write_timeout <= 120
    docs = (Path(__file__).resolve().parents[2] / "docs" / "STORAGE.md").read_text()
    for name in ("CKPTKIT_REMOTE_TIMEOUT", "CKPTKIT_REMOTE_WRITE_TIMEOUT"):
        assert name in docs


def test_limits_come_from_env_url_or_options(monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptkit.errors import ConfigError
    from ckptkit.storage.fsspec_backend import FsspecStorage

    monkeypatch.setenv("CKPTKIT_REMOTE_TIMEOUT", "7")
    monkeypatch.setenv("CKPTKIT_REMOTE_WRITE_TIMEOUT", "9.5")
    st = FsspecStorage("gs://some-bucket/run", token="anon")
    assert (st.timeouts.timeout, st.timeouts.write_timeout) == (7, 9.5)
    st = FsspecStorage("gs://some-bucket/run?token=anon&timeout=4&write_timeout=5")
    assert (st.timeouts.timeout, st.timeouts.write_timeout) == (4, 5)
    assert st.url_of("x").endswith("?token=anon&timeout=4&write_timeout=5")  # reopens alike
    st = FsspecStorage("gs://some-bucket/run", token="anon", timeout=2)
    assert st.timeouts.timeout == 2
    for bad in ("0", "-1", "soon", "nan", "inf"):
        monkeypatch.setenv("CKPTKIT_REMOTE_TIMEOUT", bad)
        with pytest.raises(ConfigError, match="CKPTKIT_REMOTE_TIMEOUT"):
            FsspecStorage("gs://some-bucket/run", token="anon")
    monkeypatch.delenv("CKPTKIT_REMOTE_TIMEOUT")
    with pytest.raises(ConfigError, match="write_timeout"):
        FsspecStorage("gs://some-bucket/run?token=anon&write_timeout=0")


# == dead endpoints: the CLI =======================================================
@pytest.mark.parametrize("command", ["ls", "inspect", "verify"])
def test_cli_fails_fast_with_one_line(dead_endpoint: str, command: str) -> None:
    url = "gs://some-bucket/runs/exp1"
    result, took = timed(lambda: CliRunner().invoke(cli, [command, url]))
    assert took < BOUND, f"{command} took {took:.0f} s"
    assert_one_line_error(result, url, dead_endpoint, "CKPTKIT_REMOTE_TIMEOUT")


@pytest.mark.slow
def test_cli_subprocess_one_line_and_no_aiohttp_noise(dead_endpoint: str) -> None:
    url = "gs://some-bucket/runs/exp1"
    start = time.monotonic()
    proc = subprocess.run(
        [CKPTKIT, "ls", url], capture_output=True, text=True, timeout=2 * BOUND, env=os.environ
    )
    # The interpreter's start (torch) is slow on a busy machine: allow it on top.
    assert time.monotonic() - start < 2 * BOUND
    assert proc.returncode == StorageError.exit_code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    assert url in lines[0] and dead_endpoint in lines[0]
    for noise in NOISE:
        assert noise not in proc.stdout + proc.stderr


# == dead endpoints: the library ===================================================
def test_storage_calls_fail_fast(dead_endpoint: str) -> None:
    from ckptkit.storage.fsspec_backend import FsspecStorage

    st = FsspecStorage("gs://some-bucket/runs/exp1")
    calls: dict[str, Callable[[], object]] = {
        "listdir": lambda: st.listdir(""),
        "read_bytes": lambda: st.read_bytes("ckpt/manifest.json"),
        "exists": lambda: st.exists("ckpt/manifest.json"),
        "write_bytes": lambda: st.write_bytes("ckpt/model.bin", os.urandom(1 << 20)),
    }
    for name, call in calls.items():
        start = time.monotonic()
        with pytest.raises(StorageError, match=dead_endpoint) as err:
            call()
        assert time.monotonic() - start < BOUND, f"{name} blocked"
        assert "\n" not in str(err.value)


def test_endpoint_answering_only_errors_fails_in_time(
    fast: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """503 to every request: retried (it is transient), but not past the limit."""
    import http.server

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def _fail(self) -> None:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_PUT = do_DELETE = _fail

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", host)
    try:
        result, took = timed(lambda: CliRunner().invoke(cli, ["ls", "gs://some-bucket/r"]))
        assert took < BOUND, f"ls took {took:.0f} s"
        assert_one_line_error(result, "gs://some-bucket/r", host, "CKPTKIT_REMOTE_TIMEOUT")
    finally:
        server.shutdown()
        server.server_close()


def test_manager_open_fails_fast(dead_endpoint: str) -> None:
    start = time.monotonic()
    with pytest.raises(StorageError, match=dead_endpoint):
        CheckpointManager("gs://some-bucket/runs/exp1")
    assert time.monotonic() - start < BOUND


# == the real emulator, dying or going silent mid-upload ===========================
@pytest.fixture
def emulator(tmp_path: Path, fast: None) -> Iterator[Emulator]:
    """A server of its own (on a free port), to kill; with a fresh bucket ``BUCKET``."""
    emu = Emulator(data_dir=str(tmp_path / "gcs")).start()
    try:
        emu.create_bucket(BUCKET)
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def proxy(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    p = FaultProxy(emulator.port)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", p.host)
    yield p
    p.close()


def test_slow_link_is_not_cut_off(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """The limits are no-progress limits: an upload and a read that take several times
    the limit, but keep moving, complete."""
    limit = float(FAST)
    with FaultProxy(emulator.port, rate=256 << 10) as slow:  # 256 KiB/s
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", slow.host)
        from ckptkit.storage.fsspec_backend import FsspecStorage

        st = FsspecStorage(f"gs://{BUCKET}/slow?timeout={limit}&write_timeout={limit}")
        data = os.urandom(5 << 19)  # ~10 s each way at that rate
        start = time.monotonic()
        st.write_bytes("ckpt/model.bin", data)
        assert time.monotonic() - start > 2 * limit  # it really was slow
        start = time.monotonic()
        assert st.read_bytes("ckpt/model.bin") == data
        assert time.monotonic() - start > 2 * limit


def test_part_boundaries_round_trip(gcs_bucket: str) -> None:
    """Uploads and reads in speed-sized parts lose no byte at any part boundary."""
    from ckptkit.storage.fsspec_backend import MIN_PART, FsspecStorage

    st = FsspecStorage(f"gs://{gcs_bucket}/parts")
    st.part_size = st.range_size = 2 * MIN_PART  # many parts, of both sizes
    for n in (0, 1, MIN_PART - 1, MIN_PART, MIN_PART + 1, 4 * MIN_PART, 5 * MIN_PART + 7):
        data = os.urandom(n)
        st.write_bytes(f"f{n}", data)
        assert st.size(f"f{n}") == n
        assert st.read_bytes(f"f{n}") == data, n


def _state(value: float) -> dict[str, Any]:
    model = torch.nn.Linear(1024, 1024)  # 4 MiB of weights: an upload in many parts
    with torch.no_grad():
        model.weight.fill_(value)
    return {"model": model}


def _fault_after(proxy: FaultProxy, nbytes: int, fault: Callable[[], None]) -> threading.Thread:
    def run() -> None:
        if proxy.wait_sent(nbytes):
            fault()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("fault", ["killed", "silent"])
def test_save_interrupted_mid_upload_raises_and_is_never_committed(
    emulator: Emulator, proxy: FaultProxy, fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"gs://{BUCKET}/runs/exp1"
    mgr = CheckpointManager(url, keep_last=None)
    mgr.save(1, _state(1.0))
    action = emulator.kill if fault == "killed" else proxy.go_silent
    start = time.monotonic()
    _fault_after(proxy, 1 << 20, action)  # a quarter into the 4 MiB model
    with pytest.raises(StorageError, match=url) as err:
        mgr.save(2, _state(2.0))
    assert time.monotonic() - start < BOUND, "save() blocked"
    assert "\n" not in str(err.value) and proxy.host in str(err.value)
    start = time.monotonic()
    with pytest.warns(UserWarning, match="could not remove the run lock"):
        mgr.close()  # the lock cannot be released: said, not hidden (the save already raised)
    assert time.monotonic() - start < BOUND, "close() blocked"
    for command in ("ls", "verify"):  # and the CLI says so too, in time
        result, took = timed(lambda c=command: CliRunner().invoke(cli, [c, url]))
        assert took < BOUND, f"{command} took {took:.0f} s"
        assert_one_line_error(result, url, proxy.host, "CKPTKIT_REMOTE_TIMEOUT")

    # The endpoint comes back: only step 1 is committed, and it restores.
    proxy.close()
    if fault == "killed":
        emulator.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
    with CheckpointManager(url, readonly=True) as ro:
        assert [c.step for c in ro.list()] == [1]
        target = _state(0.0)
        assert ro.restore(target) == 1
        assert torch.equal(target["model"].weight, torch.full((1024, 1024), 1.0))
    result = CliRunner().invoke(cli, ["ls", "--json", url])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["step"], r["status"]) for r in rows if r["status"] == "complete"] == [
        (1, "complete")
    ]


def test_an_upload_the_restarted_server_lost_is_written_again_and_committed(
    emulator: Emulator, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The emulator dies mid-upload and comes back at once without the upload session
    (a restart that lost it, as one soak trial's did, or a GCS session that expired:
    404 on the next part): the file is written again from its first byte, the save
    succeeds, and the checkpoint restores bit for bit."""
    # Limits that outlast a restart of the emulator on a loaded machine (a new Python
    # process: seconds), unlike the short ones of the dead-endpoint tests.
    monkeypatch.setenv("CKPTKIT_REMOTE_TIMEOUT", "60")
    monkeypatch.setenv("CKPTKIT_REMOTE_WRITE_TIMEOUT", "60")
    url = f"gs://{BUCKET}/runs/exp1"
    mgr = CheckpointManager(url, keep_last=None)
    mgr.save(1, _state(1.0))
    assert emulator.data_dir is not None
    meta = Path(emulator.data_dir) / ".cloudstorage" / ".meta"

    def bounce() -> None:
        emulator.kill()
        state = json.loads(meta.read_text())
        assert state["resumable"], "no upload session in flight"
        state["resumable"] = {}  # the sessions the server forgot
        meta.write_text(json.dumps(state))
        emulator.start()

    fault = _fault_after(proxy, 1 << 20, bounce)  # a quarter into the 4 MiB model
    mgr.save(2, _state(2.0))
    fault.join(60)
    mgr.close()
    with CheckpointManager(url, readonly=True) as ro:
        assert [c.step for c in ro.list()] == [1, 2]
        target = _state(0.0)
        assert ro.restore(target) == 2
        assert torch.equal(target["model"].weight, torch.full((1024, 1024), 2.0))
