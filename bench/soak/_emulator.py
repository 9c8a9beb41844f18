"""``gcp_storage_emulator``'s command line, serving each connection in its own thread.

The emulator's server is a single-threaded ``HTTPServer`` without a socket timeout: one
client killed in the middle of a request (which the soak does on purpose) leaves it
waiting on that connection forever, and every later request hangs behind it. And each
such connection prints a traceback to stderr, which the parent holds as a pipe it reads
only if the server fails to start: after a few hundred kills the pipe is full and every
server thread blocks writing to it. So: a thread per connection, a socket timeout, and
no traceback for a client that went away.
"""

from __future__ import annotations

import sys
from http import server

from gcp_storage_emulator import __main__ as cli
from gcp_storage_emulator import server as emulator_server


class _Server(server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client killed mid-request: nothing to report


emulator_server.server.HTTPServer = _Server  # type: ignore[misc]
emulator_server.RequestHandler.timeout = 10  # a half-sent request frees its thread

if __name__ == "__main__":
    sys.exit(cli.main())
