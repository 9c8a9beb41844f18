"""Choose a storage backend by URL scheme; backends are imported lazily."""

from __future__ import annotations

import importlib
import re
from typing import Any

from ckptkit.errors import StorageError
from ckptkit.storage.base import Storage

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def scheme_of(url: str) -> str:
    """``gs://b/x`` -> ``gs``; plain paths (and Windows drive letters) -> ``""``."""
    m = _SCHEME.match(url)
    return m.group(1).lower() if m else ""


def _factories() -> dict[str, Any]:
    from ckptkit.hooks.manager import get_plugin_manager

    merged: dict[str, Any] = {}
    # pluggy calls the last-registered plugin first; apply in registration order.
    for result in reversed(get_plugin_manager().hook.ckptkit_register_storage()):
        merged.update(result or {})
    return merged


def _resolve(factory: Any) -> Any:
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        return getattr(importlib.import_module(module), attr)
    return factory


def open_storage(url: str) -> Storage:
    """Open the storage rooted at ``url``. Unknown schemes go to the generic fsspec
    backend when one is registered under ``"*"``."""
    if not isinstance(url, str) or not url.strip():
        raise StorageError(
            f"{url!r} is not a storage URL: give a path, file://, gs://, drive:// ..."
        )
    url = url.strip()
    scheme = scheme_of(url)
    factories = _factories()
    factory = factories.get(scheme) or factories.get("*")
    if factory is None:
        known = ", ".join(sorted(s + "://" for s in factories if s and s != "*"))
        raise StorageError(f"{url}: no storage backend for '{scheme}://' (known: {known})")
    return _resolve(factory)(url)
