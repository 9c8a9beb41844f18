"""pytest plugin: a real ``gcp-storage-emulator`` server for ``gs://`` tests.

Load it with ``pytest_plugins = ["tests.gcs_emulator"]`` in the top-level conftest.
Fixtures:

``gcs_emulator`` (session)
    starts the emulator on a free port of 127.0.0.1, sets ``STORAGE_EMULATOR_HOST``
    (and ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``, without which every gcsfs call
    against the emulator stalls ~60 s) and returns the host URL. Tests that use it
    are skipped, with the reason, when the emulator is not installed.
``gcs_bucket``
    a fresh, empty bucket on that emulator; returns its name.

:class:`Emulator` runs one server in a subprocess, so that a test can kill it
mid-upload and start it again (with ``data_dir`` the objects survive a restart).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

# gcsfs reads this when it is imported; it must be false before that happens.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

PROJECT = "test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def emulator_installed() -> bool:
    return importlib.util.find_spec("gcp_storage_emulator") is not None


class Emulator:
    """``python -m gcp_storage_emulator start`` on 127.0.0.1 in a subprocess."""

    # What starts the server (a subclass may start it through a wrapper).
    command: tuple[str, ...] = (sys.executable, "-m", "gcp_storage_emulator")

    def __init__(self, port: int | None = None, data_dir: str | None = None) -> None:
        self.port = port or free_port()
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Emulator:
        cmd = list(self.command)
        if self.data_dir:
            cmd += ["--data-dir", self.data_dir]
        cmd += ["start", "--host", "127.0.0.1", "--port", str(self.port), "--quiet"]
        if not self.data_dir:
            cmd.append("--in-memory")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(
                    f"gcp-storage-emulator exited with {self.proc.returncode}: {err}"
                )
            try:
                urllib.request.urlopen(f"{self.host}/storage/v1/b?project={PROJECT}", timeout=1)
                return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gcp-storage-emulator did not answer on {self.host} in {timeout:.0f} s")

    def kill(self) -> None:
        """SIGKILL: the server dies mid-request, as on a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()

    def create_bucket(self, name: str) -> str:
        req = urllib.request.Request(
            f"{self.host}/storage/v1/b?project={PROJECT}",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(req, timeout=10).close()
        return name


_session: Emulator | None = None


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[str]:
    """Host URL of a running emulator (``http://127.0.0.1:PORT``), shared by the session."""
    global _session
    if not emulator_installed():
        pytest.skip("gcp-storage-emulator is not installed: pip install -e '.[dev]'")
    if _session is not None:  # this module was also imported by a conftest
        yield _session.host
        return
    emu = _session = Emulator().start()
    mp = pytest.MonkeyPatch()
    mp.setenv("STORAGE_EMULATOR_HOST", emu.host)
    mp.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    try:
        yield emu.host
    finally:
        mp.undo()
        emu.stop()
        _session = None


@pytest.fixture
def gcs_bucket(gcs_emulator: str) -> str:
    """A fresh bucket on the session's emulator."""
    assert _session is not None
    return _session.create_bucket(f"ckptkit-{uuid.uuid4().hex[:12]}")
