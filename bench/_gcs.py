"""A gcp-storage-emulator for the ``gs://`` benchmarks, started once per benchmark run:
the soak's (``bench/soak/gcs.py``), which serves each connection in its own thread, as
GCS does, so that parallel uploads are not queued behind each other by the server."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import uuid
from collections.abc import Iterator
from typing import Any

# gcsfs reads this when it is imported: without it every call to the emulator stalls.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def missing() -> str | None:
    """Why the ``gs://`` rows cannot run here, or None when they can."""
    for module, package in (("gcsfs", "gcsfs"), ("gcp_storage_emulator", "gcp-storage-emulator")):
        if importlib.util.find_spec(module) is None:
            return f"n/a ({package} not installed: pip install -e '.[dev]')"
    return None


class Server:
    """A running emulator; ``bucket()`` makes a fresh bucket on it."""

    def __init__(self, emulator: Any) -> None:
        self._emulator = emulator
        self.host = emulator.host

    def bucket(self) -> str:
        return self._emulator.create_bucket(f"ckptkit-bench-{uuid.uuid4().hex[:10]}")

    def fs(self) -> Any:
        import gcsfs

        return gcsfs.GCSFileSystem(token="anon", project="test")


@contextlib.contextmanager
def server() -> Iterator[Server]:
    from bench.soak.gcs import Emulator

    emulator = Emulator().start()
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = emulator.host
    try:
        yield Server(emulator)
    finally:
        if saved is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = saved
        emulator.stop()
