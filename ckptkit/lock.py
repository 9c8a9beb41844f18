"""One writer per run: a lock file (pid, host, heartbeat) at the run root.

A second writer fails fast with a clear error. A lock is stale when its process is
gone (same host) or its heartbeat stopped (another host, e.g. a Colab VM that
disconnected); a stale lock is taken over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from typing import Any

from ckptkit.errors import CkptError, CorruptCheckpointError, RunLockedError
from ckptkit.run import warn
from ckptkit.storage.base import Storage
from ckptkit.storage.local import storage_error

LOCK = ".lock"
_TMP_PREFIX = f"{LOCK}-"  # a heartbeat's temporary file: .lock-<token>.tmp
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


# The run locks this process holds, by run (see ``_run_key``): a second manager on a
# run this process already writes is told so, not shown its own pid as a foreign
# writer. Held across the whole of ``acquire`` so two threads cannot both take a run.
_HELD: dict[str, RunLock] = {}
_HELD_LOCK = threading.RLock()


def _run_key(storage: Storage) -> str:
    """One key per run however its URL is spelt (trailing slash, file://, relative,
    through a symlink); object-store URLs are compared as written."""
    path = storage.local_path("")
    return os.path.realpath(path) if path else storage.url.split("?", 1)[0].rstrip("/")


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
        self._key = _run_key(storage)
        self._pid = os.getpid()

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
        except (ValueError, CorruptCheckpointError):
            return {}  # half-written lock (or a link planted in its place): treat as stale

    def _write(self) -> None:
        """Rewrite the lock (a heartbeat). Where renames are atomic, write a temporary
        file and rename it over the lock: rewriting in place truncates first, and a write
        that then fails (full disk) would leave an empty lock that reads as stale."""
        if getattr(self.storage, "commit", None) != "rename":
            self.storage.write_bytes(LOCK, self._payload())
            return
        tmp = f"{_TMP_PREFIX}{self.token}.tmp"
        try:
            self.storage.write_bytes(tmp, self._payload())
            self.storage.rename(tmp, LOCK)
        except BaseException:
            with contextlib.suppress(Exception):
                self.storage.delete(tmp)
            raise

    def _ours(self, info: dict[str, Any]) -> bool:
        """The lock is held by a RunLock of this very process."""
        if info.get("pid") != os.getpid() or info.get("process") != _PROCESS:
            return False
        return any(lock.token == info.get("token") for lock in _held_here())

    def _stale(self, info: dict[str, Any]) -> bool:
        if not info or "pid" not in info:
            return True
        if info.get("host") == socket.gethostname():
            pid = int(info["pid"])
            if pid == os.getpid():
                # Our pid: a lock this process no longer holds (a restarted container
                # reused the pid, or a release that failed) is stale.
                return not self._ours(info)
            return not _pid_alive(pid)
        return time.time() - float(info.get("heartbeat", 0)) > self.stale_after

    def _same_process_error(self) -> RunLockedError:
        return RunLockedError(
            f"{self.storage.url}: this process already holds the run lock (a "
            "CheckpointManager on this run is still open): close() it or pass readonly=True "
            "(break_lock=True takes the lock over if that manager is lost)"
        )

    def _locked_error(self, info: dict[str, Any]) -> RunLockedError:
        who = f"{self.storage.url} is being written by pid {info.get('pid')} on {info.get('host')}"
        if info.get("host") == socket.gethostname():
            # A live process here stays the holder however long we wait.
            return RunLockedError(
                f"{who}: stop that run first, or if it is not writing any more pass break_lock=True"
            )
        # A clock behind ours must not read as a heartbeat from the future.
        age = max(0.0, time.time() - float(info.get("heartbeat", 0)))
        wait = max(1, math.ceil(self.stale_after - age))
        return RunLockedError(
            f"{who} (heartbeat {age:.0f} s ago): stop that run first; if it is gone, pass "
            f"break_lock=True or retry in {wait} s, when its lock goes stale"
        )

    def acquire(self, *, break_lock: bool = False) -> None:
        """Take the run lock or raise RunLockedError (StorageError when the storage
        fails, e.g. a full disk; no partial lock is left behind)."""
        with _HELD_LOCK:
            try:
                self._acquire(break_lock)
            except OSError as exc:
                if isinstance(exc, CkptError):
                    raise
                raise storage_error(self.storage.url_of(LOCK), exc) from exc
            _HELD[self._key] = self
        self._thread = threading.Thread(target=self._beat, name="ckptkit-lock", daemon=True)
        self._thread.start()

    def _acquire(self, break_lock: bool) -> None:
        holder = _HELD.get(self._key)
        if holder is not None and holder.held and holder._pid == os.getpid():
            if not break_lock:
                raise self._same_process_error()
            holder._abandon()
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
            if self._ours(info):
                raise self._same_process_error()
            raise self._locked_error(info)
        else:
            raise RunLockedError(f"{self.storage.url}: could not take the run lock; retry")
        # Object stores have no O_EXCL: confirm we won a simultaneous race.
        info = self._read()
        if info and info.get("token") != self.token:
            raise RunLockedError(
                f"{self.storage.url}: another process took the run lock at the same time"
            )
        self.held = True
        self._remove_stale_temps()

    def _remove_stale_temps(self) -> None:
        # A holder killed mid-heartbeat leaves its temporary lock file; only the new
        # holder may remove them (another live writer's would be its heartbeat).
        with contextlib.suppress(Exception):
            for name in self.storage.listdir(""):
                if name.startswith(_TMP_PREFIX) and self.token not in name:
                    self.storage.delete(name)

    def _abandon(self) -> None:
        """Stop holding (the lock was taken over); never touch the lock file again."""
        self.held = False
        self._stop.set()
        with _HELD_LOCK:
            if _HELD.get(self._key) is self:
                del _HELD[self._key]

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
                    self._abandon()
                    return
                if not self._stop.is_set():
                    self._write()

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            info = self._read()
            if info and info.get("token") == self.token:
                self.storage.delete(LOCK)
        except OSError as exc:  # StorageError included
            # Not worth failing close() (and hiding why a save failed) over: once this
            # process is gone the next writer takes the lock over as stale.
            warn(f"could not remove the run lock ({exc}); the next writer takes it over")
        finally:
            self._abandon()


def _held_here() -> list[RunLock]:
    return [lock for lock in _HELD.values() if lock.held and lock._pid == os.getpid()]
