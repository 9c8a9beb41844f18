"""What ckptkit costs a remote store, counted on the real GCS emulator: requests per
upload, manifests read by ``latest()`` and by a save's own bookkeeping.

Counts, not timings: the requests are observed by a pass-through wrapper around
gcsfs's one HTTP entry point (``GCSFileSystem._call``), so every request ckptkit makes,
through any code path, is seen.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from ckptkit.storage.fsspec_backend import MIN_PART, FsspecStorage
from tests.gcs_emulator import emulator_installed

pytestmark = [
    pytest.mark.gcs,
    pytest.mark.skipif(not emulator_installed(), reason="gcp-storage-emulator is not installed"),
]


@dataclass
class Requests:
    """Every request gcsfs sent: ``(method, url or template, formatted path)``."""

    seen: list[tuple[str, str]] = field(default_factory=list)

    def clear(self) -> None:
        self.seen.clear()

    def upload_parts(self) -> int:
        """Parts of resumable uploads (the initiating request not counted)."""
        return sum(1 for m, p in self.seen if m == "POST" and "upload_id=" in p)

    def reads_of(self, basename: str) -> int:
        """Downloads of objects named ``basename`` (the bytes, not their metadata)."""
        return sum(1 for m, p in self.seen if m == "GET" and "alt=media" in p and basename in p)


@pytest.fixture
def requests(monkeypatch: pytest.MonkeyPatch) -> Iterator[Requests]:
    import gcsfs.core

    log = Requests()
    real = gcsfs.core.GCSFileSystem._call

    async def counted(self: Any, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        strs = [a for a in args if isinstance(a, str)]
        where = path.format(*strs) if "{}" in path else path
        log.seen.append((method, where.replace("%2F", "/")))
        return await real(self, method, path, *args, **kwargs)

    monkeypatch.setattr(gcsfs.core.GCSFileSystem, "_call", counted)
    yield log


# == uploads ========================================================================


def test_large_upload_goes_in_few_parts(gcs_bucket: str, requests: Requests) -> None:
    """Parts grow quickly to the largest size, and the next upload starts at the speed
    the last one saw: every part costs the store a round trip (and the emulator a copy
    of what it holds so far), so 8 MiB parts made a 100 MB upload 0.55x a plain pipe."""
    st = FsspecStorage(f"gs://{gcs_bucket}/big")
    data = os.urandom(24 << 20)
    st.write_bytes("a.bin", data)
    first = requests.upload_parts()
    st.child("sub").write_bytes("b.bin", data)  # a child shares what was learned
    second = requests.upload_parts() - first
    assert st.read_bytes("a.bin") == data and st.read_bytes("sub/b.bin") == data
    assert first <= 3, requests.seen
    assert second == 1, requests.seen


def test_upload_of_chunks_round_trips_at_every_boundary(gcs_bucket: str) -> None:
    """The one upload core that write_bytes and a streaming write share: chunks of any
    size in, known or unknown total, objects byte-identical out, no part misplaced."""
    st = FsspecStorage(f"gs://{gcs_bucket}/chunks")
    st.part_size = 2 * MIN_PART  # many parts
    blob = os.urandom(5 * MIN_PART + 7)
    cases = {
        "empty": [],
        "one": [blob[:1]],
        "exact": [blob[: 2 * MIN_PART]],
        "odd": [blob[:1000], blob[1000 : MIN_PART + 3], blob[MIN_PART + 3 :]],
        "tiny": [blob[i : i + 4099] for i in range(0, 3 * MIN_PART, 4099)],
    }
    for name, chunks in cases.items():
        whole = b"".join(chunks)
        for total in (len(whole), None):
            key = f"{name}-{total is None}"
            st._upload(key, st._p(key), iter(chunks), total)
            assert st.size(key) == len(whole), key
            assert st.read_bytes(key) == whole, key
