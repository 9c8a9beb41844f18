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
Endpoints that fail, for tests of bounded failure (every port is picked free, so
several sessions can run side by side):

:func:`refused_port`
    a port of 127.0.0.1 nobody listens on (connections are refused).
:class:`SilentServer`
    accepts connections and never reads or answers; stops by itself.
:class:`FaultProxy`
    a TCP proxy in front of an emulator that counts the bytes sent through it and
    can go silent (keep every connection open, forward nothing) at any moment.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import IO

import pytest

# gcsfs reads this when it is imported; it must be false before that happens.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

PROJECT = "test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def refused_port() -> int:
    """A port on 127.0.0.1 where nobody listens: a connection there is refused."""
    return free_port()


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts connections and never answers (nor
    reads what it is sent): a hung endpoint. It stops after ``lifetime`` seconds
    even if nobody calls :meth:`close`, so a failing test cannot leave it behind."""

    def __init__(self, lifetime: float = 120.0) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = int(self._sock.getsockname()[1])
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._until = time.monotonic() + lifetime
        self._thread = threading.Thread(target=self._serve, name="silent-server", daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._until:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # timeout: look at the clock again
                continue
            self._held.append(conn)  # kept open, never read: the client just waits
        for conn in self._held:
            conn.close()
        self._sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def __enter__(self) -> SilentServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FaultProxy:
    """Forwards 127.0.0.1:``port`` to ``target_port``. :attr:`sent` counts the bytes
    clients sent through it; after :meth:`go_silent` it forwards nothing more in either
    direction and new connections are accepted and left waiting, as with a hung
    server. With ``rate`` (bytes/s) each direction of each connection is throttled to
    it: a slow link. It stops after ``lifetime`` seconds at the latest."""

    def __init__(
        self, target_port: int, lifetime: float = 300.0, rate: float | None = None
    ) -> None:
        self.target_port = target_port
        self.rate = rate
        self.sent = 0
        self.silent = threading.Event()
        self._stop = threading.Event()
        self._until = time.monotonic() + lifetime
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = int(self._sock.getsockname()[1])
        threading.Thread(target=self._serve, name="fault-proxy", daemon=True).start()

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def go_silent(self) -> None:
        self.silent.set()

    def _done(self) -> bool:
        return self._stop.is_set() or time.monotonic() > self._until

    def _serve(self) -> None:
        while not self._done():
            try:
                client, _ = self._sock.accept()
            except OSError:
                continue
            self._socks.append(client)
            if self.silent.is_set():
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()  # the server is down: the client sees a reset
                continue
            self._socks.append(upstream)
            for src, dst, count in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, count), daemon=True).start()
        self.close()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        src.settimeout(0.2)
        while not self._done():
            if self.silent.is_set():
                time.sleep(0.2)  # hold the connection, forward nothing
                continue
            try:
                data = src.recv(int(min(64 << 10, self.rate / 20)) if self.rate else 64 << 10)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            if count:
                with self._lock:
                    self.sent += len(data)
            try:
                dst.sendall(data)
            except OSError:
                with contextlib.suppress(OSError):
                    src.close()
                return
            if self.rate:
                time.sleep(len(data) / self.rate)

    def wait_sent(self, nbytes: int, timeout: float = 60.0) -> bool:
        """Block until clients sent ``nbytes`` more than now; False on timeout."""
        target = self.sent + nbytes
        deadline = time.monotonic() + timeout
        while self.sent < target:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        self._stop.set()
        for s in [self._sock, *self._socks]:
            with contextlib.suppress(OSError):
                s.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
        self._log: IO[bytes] | None = None

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
        # Its log goes to a file, not a pipe: nobody reads a pipe while tests run, and
        # once its buffer is full (a few dozen tracebacks of dropped connections)
        # the server blocks on the write and every later request hangs.
        if self._log is not None:  # a restart after kill()
            self._log.close()
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.seek(0)
                err = self._log.read().decode(errors="replace")
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
        if self._log is not None:
            self._log.close()
            self._log = None

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
