"""The built-in storage backends, registered as a plugin like any other.

Factories are import strings, so gcsfs, fsspec and the Drive uploader are imported
only when a URL of their scheme is opened.
"""

from __future__ import annotations

from typing import Any

from ckptkit.hooks.spec import hookimpl

_FSSPEC = "ckptkit.storage.fsspec_backend:FsspecStorage"


@hookimpl
def ckptkit_register_storage() -> dict[str, Any]:
    return {
        "file": "ckptkit.storage.local:LocalStorage",
        "": "ckptkit.storage.local:LocalStorage",
        "memory": _FSSPEC,
        "gs": _FSSPEC,
        "gcs": _FSSPEC,
        "drive": "ckptkit.storage.drive:DriveStorage",
        # Any other scheme: whatever fsspec knows (s3://, az://, hf:// ...).
        "*": _FSSPEC,
    }
