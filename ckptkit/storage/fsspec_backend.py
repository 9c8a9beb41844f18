"""Any fsspec filesystem as ckptkit storage: ``gs://``, ``memory://``, ``s3://`` ...

Object stores have no atomic directory rename, so ``commit = "marker"``: files go
straight into the checkpoint directory and the manifest, written last, is the commit.

URL forms::

    gs://bucket/runs/exp1                      gcsfs (``pip install 'ckptkit[gcs]'``)
    gs://bucket/runs/exp1?token=anon&project=p storage options in the query string
    memory://runs/exp1                         fsspec's in-process store (tests)
    s3://bucket/runs/exp1                      any protocol fsspec knows, if installed

Query values are parsed as JSON when they parse (``requester_pays=true`` -> ``True``),
else kept as strings. Options can also come from fsspec's own environment variables
(``FSSPEC_GS_TOKEN=anon``, ``FSSPEC_GS='{"project": "p"}'``), read when fsspec is
imported. With ``STORAGE_EMULATOR_HOST`` set, ``gs://`` defaults to ``token="anon"``.

Nothing heavy is imported until a storage is opened. Every call is retried, with
exponential backoff, when it fails transiently (connection errors, timeouts, 408, 429,
5xx); other failures become a one-line :class:`~ckptkit.errors.StorageError` naming the
URL. A missing key raises :class:`FileNotFoundError`, like the local backend.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import os
import random
import re
import stat
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from ckptkit.errors import CkptError, MissingDependencyError, StorageError, install_hint
from ckptkit.storage import confined
from ckptkit.storage.base import Storage, join_key
from ckptkit.storage.confined import Member
from ckptkit.storage.registry import scheme_of

T = TypeVar("T")

# Protocols whose first path component is a bucket (never created or removed by us).
_BUCKETED = frozenset({"gs", "gcs", "s3", "s3a", "az", "abfs", "abfss", "oci", "oss"})
_GCS_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Matched against the exception's class hierarchy, so that requests/aiohttp/botocore
# errors are recognised without importing those packages.
_TRANSIENT_NAMES = frozenset(
    {
        "ChecksumError",
        "ChunkedEncodingError",
        "ClientConnectionError",
        "ClientOSError",
        "ClientPayloadError",
        "ConnectTimeout",
        "ConnectionError",
        "EndpointConnectionError",
        "FSTimeoutError",
        "IncompleteRead",
        "ProxyError",
        "ReadTimeout",
        "RemoteDisconnected",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "Timeout",
    }
)


# -- retries ----------------------------------------------------------------------
def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying: the network or the server hiccuped."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError, CkptError)):
        return False
    for attr in ("code", "status", "status_code"):
        try:
            if int(getattr(exc, attr, None)) in _TRANSIENT_STATUS:  # type: ignore[arg-type]
                return True
        except (TypeError, ValueError):
            pass
    return any(cls.__name__ in _TRANSIENT_NAMES for cls in type(exc).__mro__)


def retry_call(
    fn: Callable[[], T],
    *,
    attempts: int,
    backoff: float,
    max_delay: float = 30.0,
    transient: Callable[[BaseException], bool] = is_transient,
) -> T:
    """Call ``fn`` up to ``attempts`` times, sleeping ``backoff * 2**i`` (jittered,
    capped at ``max_delay``) after the i-th transient failure; re-raise the last error."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if i >= attempts - 1 or not transient(exc):
                raise
            time.sleep(min(max_delay, backoff * 2**i) * random.uniform(0.5, 1.0))
    raise AssertionError("unreachable")  # attempts < 1


# -- opening ----------------------------------------------------------------------
def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _query_options(query: str) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        try:
            options[name] = json.loads(value)
        except ValueError:
            options[name] = value
    return options


def _missing_package(protocol: str, url: str, exc: ImportError) -> MissingDependencyError:
    if protocol in ("gs", "gcs"):
        return MissingDependencyError(f"{url}: gs:// needs gcsfs: {install_hint('gcs', 'gcsfs')}")
    from fsspec.registry import known_implementations

    known = known_implementations.get(protocol, {})
    package = (known.get("class") or getattr(exc, "name", None) or protocol).split(".")[0]
    return MissingDependencyError(
        f"{url}: {protocol}:// needs the {package} package ({known.get('err') or exc}): "
        f"pip install {package}"
    )


def _filesystem(protocol: str, options: dict[str, Any], url: str) -> Any:
    """The fsspec filesystem for ``protocol`` (fsspec caches instances per options)."""
    if protocol in ("gs", "gcs") and os.environ.get("STORAGE_EMULATOR_HOST"):
        # Read by gcsfs at import: unset, every call against the emulator stalls ~60 s.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        options.setdefault("token", "anon")
    import fsspec

    try:
        cls = fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise StorageError(
            f"{url}: no storage backend for '{protocol}://' (neither a ckptkit backend "
            "nor a protocol fsspec knows)"
        ) from None
    except ImportError as exc:
        raise _missing_package(protocol, url, exc) from None
    try:
        return cls(**options)
    except ImportError as exc:
        raise _missing_package(protocol, url, exc) from None
    except (TypeError, ValueError) as exc:
        raise StorageError(
            f"{url}: bad storage options {sorted(options)}: {_one_line(exc)}"
        ) from None


def _root_path(protocol: str, fs: Any, base: str, url: str) -> str:
    rest = base.split("://", 1)[1]
    if not rest.strip("/"):
        raise StorageError(
            f"{url}: no path in the URL: give one such as {protocol}://bucket/runs/exp1"
        )
    if protocol in _BUCKETED:
        bucket = rest.split("/", 1)[0]
        if not bucket:
            raise StorageError(
                f"{url}: no bucket name: write {protocol}://BUCKET/path (two slashes)"
            )
        if protocol in ("gs", "gcs") and not _GCS_BUCKET.fullmatch(bucket):
            raise StorageError(
                f"{url}: {bucket!r} is not a valid bucket name (lowercase letters, digits, "
                "'-', '_' and '.'; 3 to 222 characters)"
            )
    return fs._strip_protocol(base).rstrip("/")


def _abandon(f: Any, exc: BaseException) -> None:
    """Drop a half-written file so that neither close() nor the garbage collector
    finalizes it: an unfinished multipart/resumable upload never becomes an object."""
    if not is_transient(exc):  # the server is reachable: cancel the upload there too
        with contextlib.suppress(Exception):
            f.discard()
    with contextlib.suppress(Exception):
        f.closed = True


class FsspecStorage:
    """A directory on any fsspec filesystem; writes are synchronous and retried.

    ``storage_options`` (keyword arguments) override those from the URL query.
    Listings are always fetched fresh; :meth:`invalidate` also drops the cached
    file info that ``exists``/``size``/``isdir`` may use, so that another process's
    new checkpoint becomes visible.
    """

    commit = "marker"
    attempts = 4  # tries per call, counting the first
    backoff = 0.5  # seconds before the first retry; doubles each time
    part_size = 8 << 20  # larger writes are streamed in parts of this size

    def __init__(self, url: str, **storage_options: Any) -> None:
        if not isinstance(url, str) or "://" not in url:
            raise StorageError(f"{url!r}: not an fsspec URL (protocol://path)")
        base, _, query = url.partition("?")
        protocol = scheme_of(base)
        if not protocol:
            raise StorageError(f"{url}: malformed URL: expected protocol://path")
        options = {**_query_options(query), **storage_options}
        self.url = url
        self.protocol = protocol
        self._base = base.rstrip("/")
        self._query = query
        self._fs = _filesystem(protocol, options, url)
        self._root = _root_path(protocol, self._fs, base, url)
        self._bucket_ok = protocol not in _BUCKETED

    # -- keys -------------------------------------------------------------------
    def _p(self, key: str) -> str:
        key = join_key(key)
        return f"{self._root}/{key}" if key else self._root

    def child(self, key: str) -> FsspecStorage:
        sub = copy.copy(self)
        sub._root = self._p(key)
        sub._base = f"{self._base}/{join_key(key)}" if join_key(key) else self._base
        sub.url = self.url_of(key)
        return sub

    def url_of(self, key: str) -> str:
        key = join_key(key)
        if not key:
            return self.url
        return f"{self._base}/{key}" + (f"?{self._query}" if self._query else "")

    def local_path(self, key: str) -> str | None:
        return None

    # -- errors -----------------------------------------------------------------
    def _call(self, key: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with retries; FileNotFoundError/FileExistsError pass through,
        anything else becomes a StorageError naming the URL."""
        try:
            return retry_call(fn, attempts=self.attempts, backoff=self.backoff)
        except (FileNotFoundError, FileExistsError, CkptError):
            raise
        except Exception as exc:
            raise self._error(key, exc) from exc

    def _error(self, key: str, exc: BaseException) -> StorageError:
        url = self.url_of(key)
        text = str(exc)
        code = getattr(exc, "code", None) or getattr(exc, "status", None)
        if isinstance(exc, PermissionError) or "Forbidden" in text or str(code) in ("401", "403"):
            hint = "permission denied"
            if self.protocol in ("gs", "gcs"):
                hint += (
                    " (credentials: GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth "
                    "application-default login`, or the token= storage option)"
                )
            return StorageError(f"{url}: {hint}")
        if is_transient(exc):
            return StorageError(f"{url}: gave up after {self.attempts} attempts: {_one_line(exc)}")
        return StorageError(f"{url}: {_one_line(exc)}")

    def _bucket_missing(self) -> bool:
        """True when the URL's bucket does not exist (checked once it is needed)."""
        if self._bucket_ok:
            return False
        bucket = self._root.split("/", 1)[0]
        try:
            self._call("", lambda: self._fs.info(bucket))
        except FileNotFoundError:
            return True
        self._bucket_ok = True
        return False

    def _missing_bucket_error(self) -> StorageError:
        bucket = self._root.split("/", 1)[0]
        fix = (
            f"gcloud storage buckets create gs://{bucket}" if self.protocol in ("gs", "gcs") else ""
        )
        return StorageError(
            f"{self.url}: bucket {bucket!r} does not exist (or is not visible with these "
            f"credentials){': create it with `' + fix + '`' if fix else ''}"
        )

    def _not_found(self, key: str) -> OSError:
        if self._bucket_missing():
            return self._missing_bucket_error()
        return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), self.url_of(key))

    def _info(self, key: str) -> dict[str, Any] | None:
        path = self._p(key)
        try:
            return self._call(key, lambda: self._fs.info(path))
        except FileNotFoundError:
            return None

    # -- reads ------------------------------------------------------------------
    def open_member(
        self, key: str, *, size: int | None = None, max_size: int | None = None
    ) -> Member:
        """Check the object's size now (one metadata request); reading fetches at most
        that size + 1 bytes (object stores have no links to refuse)."""
        url = self.url_of(key)
        confined.key_parts(key, url)
        info = self._info(key)
        if info is None:
            raise self._not_found(key)
        if info.get("type") == "directory":
            raise confined.not_confined(url, stat.S_IFDIR)
        actual = int(info.get("size") or 0)
        confined.check_size(url, actual, size, max_size)
        path = self._p(key)

        def fetch(limit: int) -> bytes:
            try:
                return self._call(key, lambda: self._fs.cat_file(path, start=0, end=limit))
            except FileNotFoundError:
                raise self._not_found(key) from None

        return Member(url, actual, fetch=fetch)

    def read_bytes(self, key: str) -> bytes:
        path = self._p(key)
        try:
            return self._call(key, lambda: self._fs.cat_file(path))
        except FileNotFoundError:
            raise self._not_found(key) from None

    def exists(self, key: str) -> bool:
        return self._info(key) is not None

    def isdir(self, key: str) -> bool:
        info = self._info(key)
        return info is not None and info.get("type") == "directory"

    def size(self, key: str) -> int:
        info = self._info(key)
        if info is None:
            raise self._not_found(key)
        return int(info["size"])

    def mtime(self, key: str) -> float | None:
        try:
            return float(self._fs.modified(self._p(key)).timestamp())
        except Exception:  # not every filesystem reports one
            return None

    def listdir(self, key: str = "") -> list[str]:
        path = self._p(key)
        # Always a fresh listing: this is how checkpoints written elsewhere are found.
        self._fs.invalidate_cache(path)
        try:
            entries = self._call(key, lambda: self._fs.ls(path, detail=False))
        except FileNotFoundError:
            if self._bucket_missing():
                raise self._missing_bucket_error() from None
            return []
        names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != path}
        return sorted(n for n in names if n)

    def sha256(self, key: str) -> str | None:
        return None  # GCS/S3 report md5/crc32c, not sha256: the reader hashes

    # -- writes -----------------------------------------------------------------
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key``; parts of :attr:`part_size` are streamed (a
        resumable/multipart upload that only becomes an object once complete)."""
        path = self._p(key)

        def put() -> None:
            if len(data) <= self.part_size:
                self._fs.pipe_file(path, bytes(data))
            else:
                self._stream(path, self._parts(data))

        try:
            self._call(key, put)
        except FileNotFoundError as exc:
            if self._bucket_missing():
                raise self._missing_bucket_error() from None
            raise self._error(key, exc) from exc

    def _parts(self, data: bytes) -> Iterator[memoryview]:
        view = memoryview(data)
        for offset in range(0, len(view), self.part_size):
            yield view[offset : offset + self.part_size]

    def _stream(self, path: str, parts: Iterator[memoryview]) -> None:
        f = self._fs.open(path, "wb", block_size=self.part_size)
        try:
            for part in parts:
                f.write(part)
            f.close()
        except BaseException as exc:
            _abandon(f, exc)
            raise

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Best effort: check, then create with the store's precondition where it has
        one (GCS ``ifGenerationMatch=0``; the emulator ignores it)."""
        if self.exists(key):
            return False
        path = self._p(key)

        def create() -> None:
            try:
                self._fs.pipe_file(path, bytes(data), mode="create")
            except TypeError:  # a filesystem without modes
                self._fs.pipe_file(path, bytes(data))

        try:
            self._call(key, create)
        except FileExistsError:
            return False
        except FileNotFoundError as exc:
            if self._bucket_missing():
                raise self._missing_bucket_error() from None
            raise self._error(key, exc) from exc
        return True

    def mkdir(self, key: str) -> None:
        if self.protocol in _BUCKETED:
            return  # prefixes are implicit; makedirs could even create a bucket
        path = self._p(key)
        self._call(key, lambda: self._fs.makedirs(path, exist_ok=True))

    def delete(self, key: str, recursive: bool = False) -> None:
        with contextlib.suppress(FileNotFoundError):  # gone already, or meanwhile
            self._delete(key, recursive)
        self._fs.invalidate_cache(self._p(key))

    def _delete(self, key: str, recursive: bool) -> None:
        path = self._p(key)
        info = self._info(key)
        if info is None:
            return
        if info.get("type") == "directory":
            if not recursive:
                if self.listdir(key):
                    raise StorageError(f"{self.url_of(key)}: directory not empty")
                if self.protocol not in _BUCKETED:
                    self._call(key, lambda: self._fs.rmdir(path))
                return
            if self.protocol in _BUCKETED and "/" not in path:
                # rm(bucket, recursive=True) would delete the bucket itself.
                self._call(key, lambda: self._fs.rm(self._fs.find(path)))
            else:
                self._call(key, lambda: self._fs.rm(path, recursive=True))
        else:
            self._call(key, lambda: self._fs.rm_file(path))

    def rename(self, src: str, dst: str) -> None:
        """Copy-then-delete (object stores cannot rename): not atomic, and slow on GCS.
        Only the ``rename`` commit strategy uses it, which this backend does not declare."""
        self._call(dst, lambda: self._fs.mv(self._p(src), self._p(dst), recursive=True))

    def sync_dir(self, key: str) -> None:
        pass  # each object is durable once its upload returns

    def invalidate(self) -> None:
        self._fs.invalidate_cache()

    def flush(self) -> None:
        pass  # writes are synchronous

    def close(self) -> None:
        pass  # the filesystem instance is shared (fsspec caches it)


_: type[Storage] = FsspecStorage  # structural check
__all__ = ["FsspecStorage", "is_transient", "retry_call"]
