"""Backend conformance: every storage behaves the same through the Storage protocol.

Then backend-specific behaviour: error messages, retries, the GCS emulator killed
mid-upload, and Drive's ordered write-behind queue (failures, order, recovery).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import subprocess
import sys
import textwrap
import threading
import time
import types
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptkit.errors import MissingDependencyError, StorageError
from ckptkit.storage import drive as drive_mod
from ckptkit.storage.base import Storage
from ckptkit.storage.drive import DriveStorage
from ckptkit.storage.drive._uploader import Uploader
from ckptkit.storage.fsspec_backend import FsspecStorage, is_transient, retry_call
from ckptkit.storage.registry import open_storage
from tests.gcs_emulator import Emulator, FaultProxy, emulator_installed

ROOT = Path(__file__).resolve().parents[2]


def small_parts(storage: Storage) -> None:
    """Make fsspec backends stream anything over 256 KiB (GCS's smallest part)."""
    if isinstance(storage, FsspecStorage):
        storage.part_size = 256 << 10


# == conformance ==================================================================
def test_is_a_storage(storage: Storage, backend: str) -> None:
    assert isinstance(storage, Storage)
    assert storage.commit == ("rename" if backend == "local" else "marker")
    assert (storage.local_path("x") is not None) == (backend == "local")


def test_write_read_exists_size(storage: Storage) -> None:
    storage.write_bytes("a.bin", b"hello")
    for _ in range(2):  # before and after background work (Drive) is flushed
        assert storage.read_bytes("a.bin") == b"hello"
        assert storage.exists("a.bin")
        assert storage.size("a.bin") == 5
        assert not storage.isdir("a.bin")
        assert isinstance(storage.mtime("a.bin"), float)
        assert storage.sha256("a.bin") in (None, _sha("hello"))
        storage.flush()


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def test_overwrite_and_empty_file(storage: Storage) -> None:
    storage.write_bytes("m.json", b"1")
    storage.write_bytes("m.json", b"22")
    storage.write_bytes("empty", b"")
    assert storage.read_bytes("m.json") == b"22"
    assert storage.read_bytes("empty") == b""
    storage.flush()
    assert storage.read_bytes("m.json") == b"22"
    assert storage.size("empty") == 0


def test_listdir_and_isdir(storage: Storage) -> None:
    assert storage.listdir("") == []
    for key in ("ckpt-1/model.bin", "ckpt-1/manifest.json", "ckpt-2/deep/x", "top.json"):
        storage.write_bytes(key, key.encode())
    for _ in range(2):
        assert storage.listdir("") == ["ckpt-1", "ckpt-2", "top.json"]
        assert storage.listdir("ckpt-1") == ["manifest.json", "model.bin"]
        assert storage.listdir("ckpt-2") == ["deep"]
        assert storage.listdir("missing") == []
        assert storage.listdir("top.json") == []
        assert storage.isdir("ckpt-1") and storage.isdir("ckpt-2/deep")
        assert storage.exists("ckpt-1")
        assert not storage.isdir("missing") and not storage.exists("missing")
        storage.flush()


def test_large_file_round_trip(storage: Storage) -> None:
    small_parts(storage)
    data = os.urandom((1 << 20) + 3)  # four full parts and a short one
    storage.write_bytes("ckpt-1/model.safetensors", data)
    storage.flush()
    assert storage.size("ckpt-1/model.safetensors") == len(data)
    assert storage.read_bytes("ckpt-1/model.safetensors") == data


def test_missing_key(storage: Storage) -> None:
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        storage.read_bytes("nope.bin")
    with pytest.raises(FileNotFoundError):
        storage.size("ckpt-9/nope.bin")
    assert not storage.exists("nope.bin")
    assert storage.mtime("nope.bin") is None


def test_delete(storage: Storage) -> None:
    for key in ("ckpt-1/a", "ckpt-1/sub/b", "ckpt-2/a", "f"):
        storage.write_bytes(key, b"x")
    storage.delete("f")
    storage.delete("never-there")  # ignored
    storage.delete("ckpt-9", recursive=True)  # ignored
    with pytest.raises(StorageError, match="not empty"):
        storage.delete("ckpt-1")
    storage.delete("ckpt-1/manifest.json")  # missing: ignored
    storage.delete("ckpt-1", recursive=True)
    for _ in range(2):
        assert storage.listdir("") == ["ckpt-2"]
        assert not storage.exists("ckpt-1/sub/b") and not storage.exists("f")
        assert storage.read_bytes("ckpt-2/a") == b"x"
        storage.flush()


def test_write_after_delete(storage: Storage) -> None:
    storage.write_bytes("ckpt-1/a", b"old")
    storage.delete("ckpt-1", recursive=True)
    storage.write_bytes("ckpt-1/a", b"new")
    for _ in range(2):
        assert storage.read_bytes("ckpt-1/a") == b"new"
        assert storage.listdir("") == ["ckpt-1"]
        storage.flush()


def test_create_exclusive(storage: Storage) -> None:
    assert storage.create_exclusive(".lock", b"mine")
    assert not storage.create_exclusive(".lock", b"theirs")
    assert storage.read_bytes(".lock") == b"mine"
    storage.write_bytes(".lock", b"heartbeat")  # the lock's heartbeat
    assert storage.read_bytes(".lock") == b"heartbeat"
    storage.delete(".lock")
    assert not storage.exists(".lock")
    assert storage.create_exclusive(".lock", b"again")
    storage.flush()
    assert storage.read_bytes(".lock") == b"again"


def test_child_and_url_of(storage: Storage, backend_url: str) -> None:
    assert storage.url == backend_url
    assert storage.url_of("") == backend_url
    assert storage.url_of("ckpt-1/model.bin") == backend_url.rstrip("/") + "/ckpt-1/model.bin"
    sub = storage.child("ckpt-1")
    assert sub.url == storage.url_of("ckpt-1")
    assert sub.commit == storage.commit
    sub.write_bytes("model.bin", b"m")
    sub.child("deep").write_bytes("x", b"d")
    assert storage.read_bytes("ckpt-1/model.bin") == b"m"
    assert storage.read_bytes("ckpt-1/deep/x") == b"d"
    assert sub.listdir("") == ["deep", "model.bin"]
    assert sub.url_of("model.bin") == storage.url_of("ckpt-1/model.bin")
    sub.flush()
    assert storage.listdir("") == ["ckpt-1"]


def test_invalidate_shows_another_writers_files(
    storage: Storage, backend_url: str, backend: str, tmp_path: Path
) -> None:
    storage.write_bytes("ckpt-1/manifest.json", b"{}")
    assert storage.listdir("") == ["ckpt-1"]
    assert not storage.exists("ckpt-2/manifest.json")  # may now be cached as absent
    if backend == "gs":  # its own filesystem instance, so its own listing cache
        other = open_storage(backend_url + "?skip_instance_cache=true")
    elif backend == "drive":  # another queue and staging area, as another process has
        other = DriveStorage(backend_url, staging=str(tmp_path / "other-staging"))
    else:
        other = open_storage(backend_url)
    other.write_bytes("ckpt-2/manifest.json", b"{}")
    other.close()
    storage.invalidate()
    assert storage.listdir("") == ["ckpt-1", "ckpt-2"]
    assert storage.exists("ckpt-2/manifest.json")
    assert storage.read_bytes("ckpt-2/manifest.json") == b"{}"


# == URLs and error messages ======================================================
def test_registry_routes_schemes(tmp_path: Path, drive_root: Path) -> None:
    from ckptkit.storage.local import LocalStorage

    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    assert isinstance(open_storage(f"memory://t/{uuid.uuid4().hex}"), FsspecStorage)
    drive = open_storage("drive://T-L/runs/x")
    assert isinstance(drive, DriveStorage)
    drive.close()


def test_unknown_scheme() -> None:
    with pytest.raises(StorageError, match=r"nosuch://a/b: no storage backend for 'nosuch://'"):
        open_storage("nosuch://a/b")


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("memory://", "no path in the URL"),
        ("gs://", "no path in the URL"),
        ("gs:///runs/x", "no bucket name"),
        ("gs://Bad_Bucket!/x", "not a valid bucket name"),
        ("drive://", "give a folder"),
        ("drive://a/../../etc", "give a folder"),
    ],
)
def test_malformed_urls(url: str, match: str, drive_root: Path) -> None:
    if url.startswith("gs"):
        pytest.importorskip("gcsfs")
    with pytest.raises(StorageError, match=match) as info:
        open_storage(url + ("?token=anon" if url.startswith("gs") else ""))
    assert "\n" not in str(info.value)
    with pytest.raises(StorageError, match="not an fsspec URL"):
        FsspecStorage("just/a/path")


def test_bad_storage_option() -> None:
    pytest.importorskip("gcsfs")
    with pytest.raises(StorageError, match="bad storage options"):
        FsspecStorage("gs://bucket/runs/x?token=anon&access=everything")


def test_drive_not_mounted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(drive_mod.ROOT_ENV, raising=False)
    monkeypatch.setattr(drive_mod, "DEFAULT_ROOT", str(tmp_path / "content/drive/MyDrive"))
    with pytest.raises(StorageError) as info:
        open_storage("drive://T-L/runs/etth1")
    assert str(info.value) == (
        f"Google Drive is not mounted at {tmp_path}/content/drive/MyDrive: in Colab run "
        "`from google.colab import drive; drive.mount('/content/drive')` (or set CKPTKIT_DRIVE_ROOT)"
    )


def test_missing_gcsfs_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = importlib.import_module("fsspec.registry")  # fsspec.registry is a mapping
    for proto in ("gs", "gcs"):
        monkeypatch.delitem(registry._registry, proto, raising=False)
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # import gcsfs -> ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'ckptkit\[gcs\]'"):
        open_storage("gs://bucket/runs/x")


def test_missing_package_for_other_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = importlib.import_module("fsspec.registry")
    monkeypatch.setitem(
        registry.known_implementations,
        "fakeproto",
        {"class": "fakeproto_pkg.FakeFileSystem", "err": "Install fakeproto_pkg to access fake"},
    )
    with pytest.raises(MissingDependencyError, match="pip install fakeproto_pkg"):
        open_storage("fakeproto://bucket/runs/x")


def test_permission_error_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gcsfs")
    st = FsspecStorage("gs://some-bucket/runs/x?token=anon")

    def forbidden(*a: object, **k: object) -> None:
        raise OSError("Forbidden: b/some-bucket/o\nsome-account lacks storage.objects.get")

    for method in ("info", "cat_file"):  # a read asks the size first
        monkeypatch.setattr(st._fs, method, forbidden)
    with pytest.raises(StorageError) as info:
        st.read_bytes("ckpt-1/manifest.json")
    msg = str(info.value)
    assert msg.startswith(
        "gs://some-bucket/runs/x/ckpt-1/manifest.json?token=anon: permission denied"
    )
    assert "GOOGLE_APPLICATION_CREDENTIALS" in msg and "\n" not in msg


def test_query_options_reach_the_filesystem() -> None:
    st = FsspecStorage(f"memory://t/{uuid.uuid4().hex}?skip_instance_cache=true")
    assert st.url_of("a") == st.url.replace("?", "/a?")
    assert st.child("a").url == st.url_of("a")


# == retries ======================================================================
class _Flaky:
    def __init__(self, fails: int, exc: BaseException) -> None:
        self.fails, self.exc, self.calls = fails, exc, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.fails:
            raise self.exc
        return "ok"


def test_retry_call_retries_transient_errors_only() -> None:
    flaky = _Flaky(2, ConnectionResetError("reset"))
    assert retry_call(flaky, attempts=3, backoff=0) == "ok" and flaky.calls == 3
    flaky = _Flaky(5, TimeoutError())
    with pytest.raises(TimeoutError):
        retry_call(flaky, attempts=3, backoff=0)
    assert flaky.calls == 3
    flaky = _Flaky(1, FileNotFoundError())
    with pytest.raises(FileNotFoundError):
        retry_call(flaky, attempts=3, backoff=0)
    assert flaky.calls == 1


def test_is_transient() -> None:
    class HttpError(Exception):
        def __init__(self, code: object) -> None:
            self.code = code

    ServerDisconnectedError = type("ServerDisconnectedError", (Exception,), {})
    assert is_transient(HttpError(503)) and is_transient(HttpError("429"))
    assert not is_transient(HttpError(404)) and not is_transient(HttpError(None))
    assert is_transient(ServerDisconnectedError()) and is_transient(ConnectionRefusedError())
    assert not is_transient(PermissionError()) and not is_transient(ValueError())


def test_fsspec_write_retries_then_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    st = FsspecStorage(f"memory://t/{uuid.uuid4().hex}")
    st.backoff = 0
    real = st._fs.pipe_file
    calls = []

    def flaky(path: str, data: bytes, **kw: object) -> None:
        calls.append(path)
        if len(calls) <= 2:
            raise ConnectionResetError("connection reset by peer")
        real(path, data, **kw)

    monkeypatch.setattr(st._fs, "pipe_file", flaky)
    st.write_bytes("a", b"1")
    assert st.read_bytes("a") == b"1" and len(calls) == 3

    def down(path: str, data: bytes, **kw: object) -> None:
        raise ConnectionRefusedError("connection refused")

    monkeypatch.setattr(st._fs, "pipe_file", down)
    with pytest.raises(StorageError, match=f"gave up after {st.attempts} attempts"):
        st.write_bytes("b", b"2")


# == GCS (emulator) ================================================================
@pytest.mark.gcs
def test_missing_bucket(gcs_emulator: str) -> None:
    st = FsspecStorage("gs://no-such-bucket-ckptkit/runs/x")
    for call in (
        lambda: st.write_bytes("a", b"1"),
        lambda: st.listdir(""),
        lambda: st.read_bytes("a"),
    ):
        with pytest.raises(StorageError, match="bucket 'no-such-bucket-ckptkit' does not exist"):
            call()


@pytest.mark.gcs
def test_subprocess_writer_becomes_visible(gcs_emulator: str, gcs_bucket: str) -> None:
    st = open_storage(f"gs://{gcs_bucket}/runs/x")
    st.write_bytes("ckpt-1/manifest.json", b"{}")
    assert st.listdir("") == ["ckpt-1"] and not st.exists("ckpt-2/manifest.json")
    script = (
        "import gcsfs; fs = gcsfs.GCSFileSystem(token='anon'); "
        f"fs.pipe('{gcs_bucket}/runs/x/ckpt-2/manifest.json', b'{{}}')"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    st.invalidate()
    assert st.exists("ckpt-2/manifest.json")
    assert st.listdir("") == ["ckpt-1", "ckpt-2"]


@pytest.fixture
def fast_gcsfs_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """gcsfs retries each request 6 times, sleeping up to ~30 s in all: not here."""
    import gcsfs.retry

    async def no_sleep(_: float) -> None:
        await asyncio.sleep(0)

    monkeypatch.setattr(gcsfs.retry, "asyncio", types.SimpleNamespace(sleep=no_sleep))


@pytest.mark.gcs
@pytest.mark.skipif(not emulator_installed(), reason="gcp-storage-emulator is not installed")
def test_emulator_killed_mid_upload(tmp_path: Path, fast_gcsfs_retries: None) -> None:
    """The upload fails with a StorageError and leaves nothing at the key: a resumable
    upload becomes an object only when its last part is sent. (Had a partial object
    appeared anyway, the manifest, written last, would not list it with its size and
    sha256, and readers would reject the checkpoint.) After a restart, writes work."""
    emu = Emulator(data_dir=str(tmp_path / "gcs")).start()
    proxy = FaultProxy(emu.port)  # counts the bytes of the upload, to kill the server mid-way
    try:
        emu.create_bucket("fault")
        st = FsspecStorage(f"gs://fault/run?endpoint_url={proxy.host}&token=anon&timeout=5")
        st.part_size, st.attempts, st.backoff = 256 << 10, 2, 0.01
        st.write_bytes("ckpt-1/manifest.json", b"{}")
        killer = threading.Thread(target=lambda: proxy.wait_sent(300 << 10) and emu.kill())
        killer.start()
        with pytest.raises(
            StorageError, match=r"gs://fault/run/ckpt-2/model.bin\?.*no successful answer"
        ):
            st.write_bytes("ckpt-2/model.bin", os.urandom(1 << 20))
        killer.join()
        emu.start()
        assert not st.exists("ckpt-2/model.bin")
        assert st.listdir("") == ["ckpt-1"]
        data = os.urandom(1 << 20)
        st.write_bytes("ckpt-2/model.bin", data)
        assert st.read_bytes("ckpt-2/model.bin") == data
    finally:
        proxy.close()
        emu.stop()


# == Drive: the ordered write-behind queue =========================================
@pytest.fixture
def drive(drive_root: Path) -> Iterator[DriveStorage]:
    st = DriveStorage("drive://T-L/runs/etth1", attempts=3, backoff=0.01)
    yield st
    with contextlib.suppress(StorageError):  # a test that left Drive failing
        st.close()


def _staged_files(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "drive-staging").rglob("files/*") if p.is_file()]


class _DriveLog:
    """Wraps the Drive copy: records each upload and can block or fail it."""

    def __init__(self, root: Path, fail: int = 0) -> None:
        self.root = root
        self.fail = fail
        self.events: list[tuple[str, bool]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.real = drive_mod._copy_file

    def __call__(self, src: str, dst: str) -> str:
        assert self.gate.wait(10)
        rel = os.path.relpath(dst, self.root / "T-L/runs/etth1")
        if self.fail:
            self.fail -= 1
            raise OSError(5, "Input/output error", dst)
        old_there = (self.root / "T-L/runs/etth1/ckpt-1/manifest.json").exists()
        self.events.append((rel, old_there))
        return self.real(src, dst)


def test_drive_save_returns_before_upload_and_reads_from_staging(
    drive: DriveStorage, drive_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _DriveLog(drive_root)
    monkeypatch.setattr(drive_mod, "_copy_file", log)
    drive.write_bytes("ckpt-1/model.bin", b"m1")
    drive.write_bytes("ckpt-1/manifest.json", b"{1}")
    drive.flush()
    log.gate.clear()  # Drive hangs: saves must still return at once
    t0 = time.monotonic()
    drive.write_bytes("ckpt-2/model.bin", b"m2" * 1000)
    drive.write_bytes("ckpt-2/manifest.json", b"{2}")
    drive.delete("ckpt-1/manifest.json")
    drive.delete("ckpt-1", recursive=True)
    assert time.monotonic() - t0 < 1.0
    run = drive_root / "T-L/runs/etth1"
    assert not (run / "ckpt-2").exists() and (run / "ckpt-1/manifest.json").exists()
    assert drive.read_bytes("ckpt-2/manifest.json") == b"{2}"
    assert drive.size("ckpt-2/model.bin") == 2000
    assert drive.listdir("") == ["ckpt-2"] and not drive.exists("ckpt-1")
    assert drive.pending()[0] == "ckpt-2/model.bin"
    assert len(_staged_files(tmp_path)) >= 1
    log.gate.set()
    drive.flush()
    # In order: the new checkpoint's files, its manifest, only then the old one goes.
    assert [e[0] for e in log.events[2:]] == ["ckpt-2/model.bin", "ckpt-2/manifest.json"]
    assert all(old for _, old in log.events[2:])
    assert sorted(os.listdir(run)) == ["ckpt-2"]
    assert _staged_files(tmp_path) == [] and drive.pending() == []


def test_drive_retries_until_verified(
    drive: DriveStorage, drive_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _DriveLog(drive_root, fail=2)  # the first upload fails twice, then works
    monkeypatch.setattr(drive_mod, "_copy_file", log)
    drive.write_bytes("ckpt-1/a", b"a")
    drive.write_bytes("ckpt-1/manifest.json", b"{}")
    drive.flush()
    assert [e[0] for e in log.events] == ["ckpt-1/a", "ckpt-1/manifest.json"]
    assert (drive_root / "T-L/runs/etth1/ckpt-1/a").read_bytes() == b"a"
    assert _staged_files(tmp_path) == []


def test_drive_corrupt_copy_is_detected_and_redone(
    drive: DriveStorage, drive_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = drive_mod._copy_file
    calls = []

    def truncating(src: str, dst: str) -> str:
        sha = real(src, dst)
        calls.append(dst)
        if len(calls) == 1:  # Drive lost the tail of the first copy
            with open(dst, "r+b") as f:
                f.truncate(1)
        return sha

    monkeypatch.setattr(drive_mod, "_copy_file", truncating)
    drive.write_bytes("ckpt-1/a", b"abc")
    drive.flush()
    assert len(calls) == 2
    assert (drive_root / "T-L/runs/etth1/ckpt-1/a").read_bytes() == b"abc"


def test_drive_flush_raises_when_uploads_keep_failing(
    drive: DriveStorage, drive_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _DriveLog(drive_root, fail=10**6)
    monkeypatch.setattr(drive_mod, "_copy_file", log)
    drive.write_bytes("ckpt-1/a", b"a")
    drive.write_bytes("ckpt-1/manifest.json", b"{}")
    with pytest.raises(StorageError, match=r"drive://T-L/runs/etth1/ckpt-1/a: could not put"):
        drive.flush()
    assert len(_staged_files(tmp_path)) == 2  # both kept
    assert not (drive_root / "T-L/runs/etth1/ckpt-1").exists()  # no manifest before its files
    assert drive.read_bytes("ckpt-1/a") == b"a"  # still served from staging
    log.fail = 0  # Drive is back: the next flush uploads everything, in order
    drive.flush()
    assert [e[0] for e in log.events] == ["ckpt-1/a", "ckpt-1/manifest.json"]
    assert _staged_files(tmp_path) == []


def test_drive_close_stops_the_thread(drive_root: Path) -> None:
    st = DriveStorage("drive://T-L/runs/etth1")
    again = open_storage("drive://T-L/runs/etth1")  # same run: same queue
    st.write_bytes("a", b"1")
    again.write_bytes("b", b"2")
    up = st._run.up
    assert up is not None and again._run.up is up
    st.close()
    assert up._thread.is_alive()  # still used by `again`
    again.close()
    assert not up._thread.is_alive()
    assert (drive_root / "T-L/runs/etth1/a").read_bytes() == b"1"
    with pytest.raises(StorageError, match="closed"):
        st.write_bytes("b", b"2")


def test_drive_leftovers_are_uploaded_in_order(
    drive_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that could not upload leaves its staging; the next one for the run
    replays it first, in journal order, and skips a manifest whose files were lost."""
    log = _DriveLog(drive_root, fail=10**6)
    monkeypatch.setattr(drive_mod, "_copy_file", log)
    first = DriveStorage("drive://T-L/runs/etth1", attempts=1, backoff=0)
    for key in ("ckpt-1/a", "ckpt-1/b", "ckpt-1/manifest.json", "ckpt-2/a", "ckpt-2/manifest.json"):
        first.write_bytes(key, key.encode())
    with pytest.raises(StorageError):
        first.close()  # staging kept for the next process
    lost = [p for p in _staged_files(tmp_path) if p.read_bytes() == b"ckpt-2/a"]
    lost[0].unlink()
    log.fail = 0
    second = DriveStorage("drive://T-L/runs/etth1", attempts=1, backoff=0)
    second.write_bytes("ckpt-3/a", b"new")
    second.close()
    assert [e[0] for e in log.events] == [
        "ckpt-1/a",
        "ckpt-1/b",
        "ckpt-1/manifest.json",
        "ckpt-3/a",
    ]
    assert not (drive_root / "T-L/runs/etth1/ckpt-2/manifest.json").exists()
    assert list((tmp_path / "drive-staging").rglob("files/*")) == []


def test_drive_live_session_is_not_adopted(
    drive: DriveStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _DriveLog(Path(os.environ[drive_mod.ROOT_ENV]))
    log.gate.clear()
    monkeypatch.setattr(drive_mod, "_copy_file", log)
    drive.write_bytes("a", b"1")
    up = drive._run.up
    assert up is not None
    run_staging = os.path.dirname(up._session.path)
    other = Uploader(
        "drive://x", up.mount.root, drive._run.target, run_staging, attempts=1, backoff=0
    )
    try:
        assert other.pending() == []
    finally:
        other.stop()
        log.gate.set()


@pytest.mark.slow
def test_drive_crashed_process_is_recovered(drive_root: Path, tmp_path: Path) -> None:
    """A process dies (os._exit, as on a Colab runtime restart) with uploads queued."""
    script = textwrap.dedent(
        """
        import os, sys
        from ckptkit.storage import drive
        def down(src, dst):
            raise OSError(5, "Drive disconnected")
        drive._copy_file = down
        st = drive.DriveStorage("drive://T-L/runs/etth1", attempts=1, backoff=0)
        for key in ("ckpt-1/model.bin", "ckpt-1/manifest.json"):
            st.write_bytes(key, key.encode())
        os._exit(0)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    assert not (drive_root / "T-L/runs/etth1/ckpt-1").exists()
    st = DriveStorage("drive://T-L/runs/etth1")
    assert not st.exists("ckpt-1")  # reading alone adopts (and replays) nothing
    assert st.create_exclusive(".lock", b"me")  # the next writer (its run lock first)...
    assert st.read_bytes("ckpt-1/manifest.json") == b"ckpt-1/manifest.json"  # ...adopts
    st.delete(".lock")
    st.close()
    run = drive_root / "T-L/runs/etth1/ckpt-1"
    assert sorted(os.listdir(run)) == ["manifest.json", "model.bin"]
    assert _staged_files(tmp_path) == []
