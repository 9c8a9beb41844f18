"""Operating-system fixtures shared by the tests: a small tmpfs of their own, and a
function run in a forked child that reports back as JSON."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


@contextlib.contextmanager
def mounted_tmpfs(mnt: Path | str, options: str) -> Iterator[str]:
    """A tmpfs mounted at ``mnt`` with ``options`` (``size=1m,nr_inodes=64``), lazily
    unmounted afterwards; the test skips where mounting is not allowed."""
    Path(mnt).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def in_fork(child: Callable[[], Any]) -> Any:
    """Run ``child`` in a forked process and return what it returned (JSON); assert that
    it exited cleanly. The child never returns into the test (``os._exit``)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.write(w, json.dumps(child()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"the child ended {status}"
    return json.loads(b"".join(chunks))
