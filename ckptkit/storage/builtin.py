"""The built-in storage backends, registered as a plugin like any other."""

from __future__ import annotations

from typing import Any

from ckptkit.hooks.spec import hookimpl


@hookimpl
def ckptkit_register_storage() -> dict[str, Any]:
    return {
        "file": "ckptkit.storage.local:LocalStorage",
        "": "ckptkit.storage.local:LocalStorage",
    }
