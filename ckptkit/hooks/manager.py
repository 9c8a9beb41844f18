"""The plugin manager: built-ins first, then entry points unless autoload is disabled."""

from __future__ import annotations

import os
import warnings

import pluggy

from ckptkit.hooks import spec

AUTOLOAD_ENV = "CKPTKIT_DISABLE_PLUGIN_AUTOLOAD"

# Built-in plugins register through the same hooks as third-party ones.
BUILTIN_PLUGINS = ("ckptkit.storage.builtin",)

_pm: pluggy.PluginManager | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager(spec.PROJECT)
        pm.add_hookspecs(spec)
        import importlib

        for name in BUILTIN_PLUGINS:
            pm.register(importlib.import_module(name), name=name)
        if not os.environ.get(AUTOLOAD_ENV):
            _load_entry_points(pm)
        _pm = pm
    return _pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    # One broken third-party plugin must not take the library down with it.
    from importlib.metadata import entry_points

    for ep in entry_points(group=spec.PROJECT):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as exc:  # noqa: BLE001 - report and go on
            warnings.warn(
                f"ckptkit plugin {ep.name!r} ({ep.value}) failed to load: {exc}; "
                f"set {AUTOLOAD_ENV}=1 to skip plugins",
                stacklevel=2,
            )


def reset_plugin_manager() -> None:
    """Forget the plugin manager (tests register plugins on a fresh one)."""
    global _pm
    _pm = None
