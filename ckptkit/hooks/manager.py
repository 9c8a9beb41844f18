"""The plugin manager: built-ins first, then entry points unless autoload is disabled."""

from __future__ import annotations

import os

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
            pm.load_setuptools_entrypoints(spec.PROJECT)
        _pm = pm
    return _pm


def reset_plugin_manager() -> None:
    """Forget the plugin manager (tests register plugins on a fresh one)."""
    global _pm
    _pm = None
