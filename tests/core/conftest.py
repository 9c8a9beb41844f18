"""Fixtures for the core suite: a fresh plugin manager per test, a run directory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ckptkit.hooks.manager import reset_plugin_manager


@pytest.fixture(autouse=True)
def fresh_plugins() -> Iterator[None]:
    """Each test starts with only the built-in plugins; its own registrations die with it."""
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture
def run_dir(tmp_path) -> str:
    """A run URL (a plain path string, as users pass it)."""
    return str(tmp_path / "run")
