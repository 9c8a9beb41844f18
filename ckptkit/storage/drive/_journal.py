"""Staging sessions: one process's staged files, the journal of its queued operations
and the ``flock`` that tells a live session from a dead one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from typing import Any

from ckptkit.errors import StorageError

JOURNAL = "journal.jsonl"
LOCK = ".lock"


class Session:
    """Staged files, a journal of queued operations and an exclusive ``flock``."""

    def __init__(self, path: str, lock_fd: int) -> None:
        self.path = path
        self.files = os.path.join(path, "files")
        self._lock_fd = lock_fd
        self._mutex = threading.Lock()
        self._journal = open(os.path.join(path, JOURNAL), "a", encoding="utf-8")  # noqa: SIM115
        self.remaining = 0  # queued operations from this session not yet done

    @classmethod
    def create(cls, run_dir: str) -> Session:
        path = os.path.join(run_dir, f"{time.time_ns():020d}-{os.getpid()}")
        os.makedirs(os.path.join(path, "files"), exist_ok=True)
        fd = try_lock(os.path.join(path, LOCK))
        if fd is None:  # pragma: no cover - a fresh folder cannot be locked by anyone
            raise StorageError(f"{path}: cannot lock a new staging session")
        return cls(path, fd)

    @classmethod
    def adopt(cls, path: str) -> Session | None:
        """The session at ``path`` when its process is gone (its lock is free)."""
        fd = try_lock(os.path.join(path, LOCK))
        return None if fd is None else cls(path, fd)

    def record(self, entry: dict[str, Any]) -> None:
        with self._mutex:
            self._journal.write(json.dumps(entry) + "\n")
            self._journal.flush()

    def entries(self) -> list[dict[str, Any]]:
        out = []
        try:
            with open(os.path.join(self.path, JOURNAL), encoding="utf-8") as f:
                for line in f:
                    # A line torn by a crash is skipped: its write never returned.
                    with contextlib.suppress(ValueError):
                        out.append(json.loads(line))
        except FileNotFoundError:
            pass
        return out

    def release(self, *, remove: bool) -> None:
        """Close the journal and drop the lock; ``remove`` deletes the folder."""
        with self._mutex:
            if not self._journal.closed:
                self._journal.close()
        if remove:
            shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def try_lock(path: str) -> int | None:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: never adopt
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


@dataclass
class Op:
    """One queued operation: ``put`` (a staged file), ``delete`` or ``mkdir``."""

    kind: str
    key: str
    session: Session
    seq: int
    staged: str = ""
    size: int = 0
    recursive: bool = False

    def entry(self) -> dict[str, Any]:
        e: dict[str, Any] = {"op": self.kind, "seq": self.seq, "key": self.key}
        if self.kind == "put":
            e["size"] = self.size
        if self.recursive:
            e["recursive"] = True
        return e


def replay(session: Session) -> list[Op]:
    """The unfinished operations in ``session``'s journal, in order; a put whose staged
    file is lost poisons the later operations into its folder (its manifest)."""
    entries = session.entries()
    done = {e["done"] for e in entries if "done" in e}
    ops: list[Op] = []
    poisoned: set[str] = set()  # folders that lost a staged file
    for e in entries:
        try:
            op = Op(e["op"], e["key"], session, e["seq"], recursive=bool(e.get("recursive")))
        except (KeyError, TypeError):
            continue  # a "done" line (or one this version does not know)
        if op.seq in done:
            continue
        folder = op.key.rpartition("/")[0]
        if op.kind == "put":
            op.staged = os.path.join(session.files, str(op.seq))
            op.size = int(e["size"])
            intact = os.path.isfile(op.staged) and os.path.getsize(op.staged) == op.size
            if not intact or folder in poisoned:
                poisoned.add(folder)  # later files here (its manifest) must not go up
                continue
        ops.append(op)
    return ops
