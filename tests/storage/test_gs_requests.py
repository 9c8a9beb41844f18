"""What ckptkit costs a remote store, counted on the real GCS emulator: requests per
upload, manifests read by ``latest()`` and by a save's own bookkeeping.

Counts, not timings: the requests are observed by a pass-through wrapper around
gcsfs's one HTTP entry point (``GCSFileSystem._call``), so every request ckptkit makes,
through any code path, is seen.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptkit
from ckptkit import CheckpointManager
from ckptkit import run as runmod
from ckptkit.manifest import MANIFEST, checkpoint_name
from ckptkit.storage.base import join_key
from ckptkit.storage.fsspec_backend import MIN_PART, FsspecStorage
from ckptkit.storage.registry import open_storage
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


def test_streamed_upload_holds_no_copy_of_the_object(gcs_bucket: str) -> None:
    """A stream of many small chunks (a checkpoint of many small tensors) is sent from
    the chunks themselves: no part-sized buffer is built, whatever the part size."""
    import tracemalloc

    st = FsspecStorage(f"gs://{gcs_bucket}/nocopy")
    chunks = [os.urandom(64 << 10) for _ in range(256)]  # 16 MiB in 64 KiB pieces
    tracemalloc.start()
    try:
        st.write_stream("many.bin", (memoryview(c) for c in chunks), 16 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert st.read_bytes("many.bin") == b"".join(chunks)
    assert peak < 4 << 20, f"{peak / 2**20:.1f} MiB allocated to upload 16 MiB"


def test_a_save_costs_its_uploads_and_little_else(gcs_bucket: str, requests: Requests) -> None:
    """A save with rotation: each file is one upload (a large one a session and one
    part), the manifest one, the rotated checkpoint one listing and a DELETE per
    object; no metadata request (``info``/``exists``) about any object."""
    state = {"model": torch.nn.Linear(1024, 1024), "step": torch.zeros(2)}
    with CheckpointManager(f"gs://{gcs_bucket}/runs/cost", keep_last=1) as mgr:
        mgr.save(1, state)
        requests.clear()
        mgr.save(2, state)
        seen = [(m, p) for m, p in requests.seen if ".lock" not in p]  # the heartbeat's
    metadata = [(m, p) for m, p in seen if m == "GET" and not p.endswith("/o")]
    listings = [(m, p) for m, p in seen if m == "GET" and p.endswith("/o")]
    assert metadata == [], seen
    assert sum(1 for m, p in seen if m == "POST" and "upload_id=" in p) == 1, seen
    assert len(listings) <= 3, seen  # the run (the manager's) and the rotated folder
    # step 1's objects: its manifest, model/step tensor files and state.json
    assert sum(1 for m, _ in seen if m == "DELETE") == 4, seen


# == latest() at 10 and 1,000 checkpoints ============================================
@dataclass
class ManifestReads:
    """Manifests opened for reading, through any storage (``open_member`` is the one
    way a checkpoint file is read), by checkpoint name."""

    names: list[str] = field(default_factory=list)

    def take(self) -> list[str]:
        out, self.names[:] = list(self.names), []
        return out


@pytest.fixture
def manifest_reads(monkeypatch: pytest.MonkeyPatch) -> ManifestReads:
    from ckptkit.storage.local import LocalStorage

    log = ManifestReads()
    for cls in (LocalStorage, FsspecStorage):
        real = cls.open_member

        def counted(self: Any, key: str, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            if key.endswith(MANIFEST):
                log.names.append(key.rsplit("/", 2)[-2] if "/" in key else "")
            return _real(self, key, *args, **kwargs)

        monkeypatch.setattr(cls, "open_member", counted)
    return log


def run_of(url: str, n: int) -> None:
    """A run of ``n`` checkpoints: step ``n`` saved for real (the latest), steps 1..n-1
    only a manifest each (cheap to make; damaged, so a reader that reached one would
    say so)."""
    with CheckpointManager(url, keep_last=None) as mgr:
        mgr.save(n, {"w": torch.zeros(3)}, {"loss": 1.0})
    storage = open_storage(url)
    manifest = runmod.read_manifest(storage, checkpoint_name(n))
    # One by one: the emulator takes longer per object the more it holds (~25 s for
    # 1,000), and parallel writes only make it slower.
    for s in range(1, n):
        data = dataclasses.replace(manifest, step=s).to_bytes()
        storage.write_bytes(join_key(checkpoint_name(s), MANIFEST), data)


def run_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest, n: int) -> str:
    if kind == "gs":
        return f"gs://{request.getfixturevalue('gcs_bucket')}/runs/n{n}"
    return str(tmp_path / f"n{n}")


@pytest.mark.parametrize("kind", ["local", pytest.param("gs", marks=pytest.mark.slow)])
def test_latest_reads_a_constant_number_of_manifests(
    kind: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    manifest_reads: ManifestReads,
    requests: Requests,
) -> None:
    """``latest()``, ``restore``/``resume`` of the latest and ``ckptkit.load(run)`` list the
    names, then read manifests from the newest back only until one is valid: the same
    few reads at 10 and at 1,000 checkpoints (and one listing request per 1,000)."""
    seen: dict[int, dict[str, list[str]]] = {}
    lists: dict[int, int] = {}
    for n in (10, 1000):
        url = run_url(kind, tmp_path, request, n)
        run_of(url, n)
        reads: dict[str, list[str]] = {}
        manifest_reads.take()
        requests.clear()
        with CheckpointManager(url, readonly=True) as mgr:
            assert mgr.latest().step == n
            reads["latest"] = manifest_reads.take()
            lists[n] = sum(1 for m, p in requests.seen if m == "GET" and p.endswith("/o"))
            assert mgr.restore({"w": torch.ones(3)}).step == n
            reads["restore"] = manifest_reads.take()
            assert mgr.restore({"w": torch.ones(3)}, n).step == n
            reads["restore(step)"] = manifest_reads.take()
        assert ckptkit.load(url)["w"].tolist() == [0.0, 0.0, 0.0]
        reads["load"] = manifest_reads.take()
        with CheckpointManager(url) as mgr:
            manifest_reads.take()  # opening a writer is not what this counts
            assert mgr.resume({"w": torch.ones(3)}).step == n
            reads["resume"] = manifest_reads.take()
        seen[n] = reads
    for n, reads in seen.items():  # only the latest's manifest, at either size
        assert all(set(names) == {checkpoint_name(n)} for names in reads.values()), reads
    assert {op: len(r) for op, r in seen[10].items()} == {
        op: len(r) for op, r in seen[1000].items()
    }
    if kind == "gs":
        assert lists[1000] <= lists[10] + 1, requests.seen


# == a save's own bookkeeping ==========================================================
@pytest.mark.parametrize("kind", ["local", "gs"])
def test_saves_read_each_manifest_of_the_run_once(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, manifest_reads: ManifestReads
) -> None:
    """Rotation (keep_last + keep_best, which needs every checkpoint's metrics) and
    revision naming use what the writer read once (the manifests a previous writer
    left, read at its first save) and what it committed itself: no manifest is read
    again, however many saves. Still right about the previous writer's checkpoints:
    its best one is kept, its damaged one is neither read twice nor touched."""
    url = run_url(kind, tmp_path, request, 5)
    with CheckpointManager(url, keep_last=None, best_metric="loss") as old:
        for step, loss in ((1, 3.0), (2, 0.5), (3, 2.0), (5, 2.5)):  # the best: step 2
            old.save(step, {"w": torch.full((3,), float(step))}, {"loss": loss})
    storage = open_storage(url)
    storage.write_bytes(join_key(checkpoint_name(4), MANIFEST), b"{not json")  # damaged
    previous = {checkpoint_name(s) for s in (1, 2, 3, 4, 5)}

    per_save: list[list[str]] = []
    with CheckpointManager(url, keep_last=4, keep_best=1, best_metric="loss") as mgr:
        manifest_reads.take()
        for step in range(6, 18):
            mgr.save(step, {"w": torch.full((3,), float(step))}, {"loss": 1.0 + step})
            per_save.append(manifest_reads.take())
        mgr.save(17, {"w": torch.zeros(3)}, {"loss": 9.0})  # a re-save: a new revision
        per_save.append(manifest_reads.take())
    assert set(per_save[0]) == previous, per_save[0]  # each read once, at the first save
    assert all(reads == [] for reads in per_save[1:]), per_save

    with pytest.warns(UserWarning, match="step-000000000004"):  # still there, still damaged
        kept = [c.name for c in CheckpointManager(url, readonly=True).list()]
    assert kept == [checkpoint_name(2)] + [checkpoint_name(s) for s in (14, 15, 16)] + [
        checkpoint_name(17, 1)
    ]


@pytest.mark.parametrize("kind", ["local", "gs"])
def test_latest_reads_down_to_the_newest_valid_and_no_further(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, manifest_reads: ManifestReads
) -> None:
    """Newer checkpoints that are damaged (a file that does not match, a manifest that
    does not parse) or were never committed (no manifest) are passed with a warning
    naming each damaged one; the older ones are not read at all."""
    url = run_url(kind, tmp_path, request, 6)
    with CheckpointManager(url, keep_last=None) as mgr:
        for step in (1, 2, 3, 6):
            mgr.save(step, {"w": torch.full((3,), float(step))})
    storage = open_storage(url)
    state_file = next(iter(runmod.read_manifest(storage, checkpoint_name(6)).files))
    key = join_key(checkpoint_name(6), state_file)
    storage.write_bytes(key, bytes(len(storage.read_bytes(key))))  # same size, wrong bytes
    storage.write_bytes(join_key(checkpoint_name(5), MANIFEST), b"[]")
    storage.write_bytes(join_key(checkpoint_name(4), "state.pt"), b"interrupted")
    manifest_reads.take()
    with CheckpointManager(url, readonly=True) as ro:
        with pytest.warns(UserWarning) as caught:
            assert ro.latest().step == 3
        said = " ".join(str(w.message) for w in caught)
        assert checkpoint_name(6) in said and checkpoint_name(5) in said
        read = set(manifest_reads.take())  # step 4's missing manifest may fail at its size
        assert {checkpoint_name(s) for s in (6, 5, 3)} <= read
        assert read <= {checkpoint_name(s) for s in (6, 5, 4, 3)}
        with pytest.warns(UserWarning):
            assert ro.restore({"w": torch.zeros(3)}).step == 3
        assert checkpoint_name(2) not in manifest_reads.take()
        target = {"w": torch.zeros(3)}
        assert ro.restore(target, 2).step == 2 and target["w"].tolist() == [2.0] * 3
        assert set(manifest_reads.take()) == {checkpoint_name(2)}


# == opening a writer ==================================================================
def test_opening_a_writer_lists_the_run_once_whatever_its_size(
    gcs_bucket: str, requests: Requests
) -> None:
    """A writer removes an interrupted save's leftovers (a step folder without a
    manifest) when it opens the run: with one listing of the run, not one request per
    checkpoint (1,000 checkpoints cost ~15 s on gs:// that way)."""
    opened: dict[int, int] = {}
    for n in (3, 30):
        url = f"gs://{gcs_bucket}/runs/open{n}"
        run_of(url, n)
        storage = open_storage(url)
        interrupted = checkpoint_name(n + 1)
        storage.write_bytes(join_key(interrupted, "model.safetensors"), b"half written")
        # A manifest deeper down (a layout's own files) does not commit the folder.
        storage.write_bytes(join_key(interrupted, "dcp", MANIFEST), b"{}")
        requests.clear()
        with CheckpointManager(url) as mgr:
            opened[n] = len(requests.seen)
            assert mgr.latest().step == n
        storage.invalidate()
        assert interrupted not in storage.listdir(""), "the leftover was not removed"
        assert checkpoint_name(n - 1) in storage.listdir("")  # committed ones stay
    assert opened[30] <= opened[3] + 2, opened
