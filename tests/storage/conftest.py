"""Fixtures for suites that run against every storage backend.

``backend_url`` is parametrized over :data:`BACKENDS` and yields a fresh run URL
string (nothing exists there yet); ``storage`` opens it with ``open_storage`` and
closes it afterwards (for Drive that flushes the upload queue). A manager-level
suite reuses them as they are::

    def test_save_restore(backend_url):
        with CheckpointManager(backend_url, keep_last=2) as mgr: ...

``gs`` cases need the emulator (``tests/gcs_emulator.py``) and are skipped, with the
reason, when it is not installed. ``drive`` cases point ``CKPTKIT_DRIVE_ROOT`` and
``CKPTKIT_DRIVE_STAGING`` at temporary folders.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptkit.storage.base import Storage
from ckptkit.storage.drive import ROOT_ENV, STAGING_ENV
from ckptkit.storage.registry import open_storage

BACKENDS = ["local", "memory", "drive", "gs"]


@pytest.fixture
def drive_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake mounted Drive (``CKPTKIT_DRIVE_ROOT``), with staging in another folder."""
    root = tmp_path / "MyDrive"
    root.mkdir()
    monkeypatch.setenv(ROOT_ENV, str(root))
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "drive-staging"))
    return root


def make_backend_url(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh run URL on backend ``kind`` (one of :data:`BACKENDS`)."""
    if kind == "local":
        return str(tmp_path / "runs" / "etth1")
    if kind == "memory":
        root = f"/ckptkit-tests/{uuid.uuid4().hex}"
        request.addfinalizer(lambda: _forget_memory(root))
        return f"memory:/{root}/runs/etth1"
    if kind == "drive":
        request.getfixturevalue("drive_root")
        return "drive://T-L/runs/etth1"
    if kind == "gs":
        return f"gs://{request.getfixturevalue('gcs_bucket')}/runs/etth1"
    raise ValueError(f"unknown backend {kind!r}: one of {BACKENDS}")


def _forget_memory(root: str) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(
    params=[pytest.param(k, marks=[pytest.mark.gcs] if k == "gs" else []) for k in BACKENDS]
)
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh run URL on each backend in turn."""
    return make_backend_url(request.param, request, tmp_path)


@pytest.fixture
def backend(backend_url: str) -> str:
    """The backend kind of ``backend_url`` (``"local"``, ``"memory"`` ...)."""
    for kind, prefix in (("memory", "memory://"), ("drive", "drive://"), ("gs", "gs://")):
        if backend_url.startswith(prefix):
            return kind
    return "local"


@pytest.fixture
def storage(backend_url: str) -> Iterator[Storage]:
    """``open_storage(backend_url)``, closed (and so flushed) after the test."""
    st = open_storage(backend_url)
    try:
        yield st
    finally:
        st.close()
