"""``gcp_storage_emulator``'s command line, serving each connection in its own thread.

The emulator's server is a single-threaded ``HTTPServer`` without a socket timeout: one
client killed in the middle of a request (which the soak does on purpose) leaves it
waiting on that connection forever, and every later request hangs behind it. And each
such connection prints a traceback to stderr, which the parent holds as a pipe it reads
only if the server fails to start: after a few hundred kills the pipe is full and every
server thread blocks writing to it. So: a thread per connection, a socket timeout, and
no traceback for a client that went away.

A thread per connection needs the emulator's state to be thread-safe, and it is not:
every write re-serialises all of its metadata to one file, ``.meta``, in place, from
whichever thread wrote. Two uploads at once (a checkpoint's files go in parallel) could
leave the older snapshot on disk last, and a kill mid-write a torn one, so an emulator
restarted after a kill (the soak's GCS fault) came back without an object it had
acknowledged: "state.json is missing" in a committed checkpoint, once in a CI run.
Real GCS never loses an acknowledged write. So every method of its ``Storage`` runs
under one lock (request bodies are read before, outside it), and ``.meta`` is written
to a temporary file and renamed over the old one.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import threading
from http import server
from typing import Any

from gcp_storage_emulator import __main__ as cli
from gcp_storage_emulator import server as emulator_server
from gcp_storage_emulator import storage as emulator_storage


class _Server(server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client killed mid-request: nothing to report


emulator_server.server.HTTPServer = _Server  # type: ignore[misc]
emulator_server.RequestHandler.timeout = 10  # a half-sent request frees its thread

_STATE_LOCK = threading.RLock()  # reentrant: the storage's methods call one another


def _serialised(method: Any) -> Any:
    @functools.wraps(method)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with _STATE_LOCK:
            return method(*args, **kwargs)

    return locked


for _name, _method in list(vars(emulator_storage.Storage).items()):
    if inspect.isfunction(_method) and not _name.startswith("__"):  # not static ones
        setattr(emulator_storage.Storage, _name, _serialised(_method))

_write_bytes = emulator_storage._FileStore.write_bytes


def _write_meta_whole(self: Any, rel: str, content: bytes) -> None:
    """``.meta`` on disk: written beside, then renamed over (a kill never tears it)."""
    root = getattr(self, "_root", None)
    if rel != ".meta" or root is None:
        _write_bytes(self, rel, content)
        return
    tmp = root / ".meta.tmp"
    tmp.write_bytes(content)
    os.replace(tmp, root / ".meta")


emulator_storage._FileStore.write_bytes = _write_meta_whole  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(cli.main())
