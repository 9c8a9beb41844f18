"""One writer per run: a lock file (pid, host, heartbeat) at the run root.

A second writer fails fast with a clear error. A lock is stale when its process is
gone (same host) or its heartbeat stopped (another host, e.g. a Colab VM that
disconnected); a stale lock is taken over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from ckptkit.errors import RunLockedError
from ckptkit.storage.base import Storage

LOCK = ".lock"
# Tells this process apart from an earlier one that had the same pid (container restarts).
_PROCESS = uuid.uuid4().hex
log = logging.getLogger("ckptkit")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(
        self, storage: Storage, *, heartbeat: float = 30.0, stale_after: float = 120.0
    ) -> None:
        self.storage = storage
        self.heartbeat = heartbeat
        self.stale_after = stale_after
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def _payload(self) -> bytes:
        info = {
            "process": _PROCESS,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "token": self.token,
            "heartbeat": time.time(),
        }
        return json.dumps(info).encode()

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.storage.read_bytes(LOCK))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # half-written lock: treat as stale

    def _stale(self, info: dict[str, Any]) -> bool:
        if not info or "pid" not in info:
            return True
        if info.get("host") == socket.gethostname():
            pid = int(info["pid"])
            if pid == os.getpid():
                # Our pid but not our process: a restarted container reused the pid.
                return info.get("process") != _PROCESS
            return not _pid_alive(pid)
        return time.time() - float(info.get("heartbeat", 0)) > self.stale_after

    def acquire(self, *, break_lock: bool = False) -> None:
        for _ in range(3):
            if self.storage.create_exclusive(LOCK, self._payload()):
                break
            info = self._read()
            if info == {}:
                # The holder may be rewriting it (a heartbeat): look again before
                # calling it stale; a lock that stays unreadable is a crashed writer's.
                time.sleep(0.2)
                info = self._read()
            if info is None:
                continue
            if info.get("token") == self.token:
                break
            if break_lock or self._stale(info):
                self.storage.delete(LOCK)
                continue
            age = time.time() - float(info.get("heartbeat", 0))
            raise RunLockedError(
                f"{self.storage.url} is being written by pid {info.get('pid')} on {info.get('host')} "
                f"(seen {age:.0f} s ago): stop that run first, or if it is gone pass "
                f"break_lock=True (or wait {max(0.0, self.stale_after - age):.0f} s)"
            )
        else:
            raise RunLockedError(f"{self.storage.url}: could not take the run lock; retry")
        # Object stores have no O_EXCL: confirm we won a simultaneous race.
        info = self._read()
        if info and info.get("token") != self.token:
            raise RunLockedError(
                f"{self.storage.url}: another process took the run lock at the same time"
            )
        self.held = True
        self._thread = threading.Thread(target=self._beat, name="ckptkit-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            # A missed heartbeat only makes the lock look older.
            with contextlib.suppress(Exception):
                info = self._read()
                if info and info.get("token") not in (None, self.token):
                    # Taken over as stale (e.g. this host was unreachable): rewriting it
                    # would make two writers; the other one keeps it.
                    log.warning(
                        "%s: the run lock was taken over by pid %s on %s; this process "
                        "no longer holds it",
                        self.storage.url,
                        info.get("pid"),
                        info.get("host"),
                    )
                    self.held = False
                    return
                self.storage.write_bytes(LOCK, self._payload())

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        info = self._read()
        if info and info.get("token") == self.token:
            self.storage.delete(LOCK)
        self.held = False
