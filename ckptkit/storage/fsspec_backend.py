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
5xx), but never past its no-progress limit (:mod:`ckptkit.storage.deadlines`:
``timeout`` for read-type calls, ``write_timeout`` for uploads); other failures become
a one-line :class:`~ckptkit.errors.StorageError` naming the URL. A missing key raises
:class:`FileNotFoundError`, like the local backend.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import inspect
import json
import logging
import os
import random
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from ckptkit.errors import CkptError, MissingDependencyError, StorageError, install_hint
from ckptkit.storage import confined
from ckptkit.storage.base import Storage, WriteLost, join_key
from ckptkit.storage.confined import Member
from ckptkit.storage.deadlines import Clock, Health, Pace, Timeouts, next_part, until_stalled
from ckptkit.storage.registry import scheme_of

T = TypeVar("T")
Buffer = bytes | bytearray | memoryview  # what an upload takes

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
        "TimeoutError",  # asyncio's, distinct from the builtin before Python 3.11
    }
)
# GCS resumable uploads take parts in multiples of 256 KiB; also the first part of a
# ranged read or upload, before its speed is known.
MIN_PART = 256 << 10


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


def _gcs_options(options: dict[str, Any], timeouts: Timeouts) -> None:
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        # Read by gcsfs at import: unset, every call against the emulator stalls ~60 s.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        options.setdefault("token", "anon")
    # gcsfs logs each request it gives up on with a traceback (logger.exception);
    # the error reaches the caller as a StorageError anyway. A NullHandler keeps
    # Python's last-resort handler from printing it when logging is not configured.
    logger = logging.getLogger("gcsfs")
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())
    try:
        import aiohttp
    except ImportError:
        return  # reported as the missing gcsfs below
    # Without a timeout gcsfs waits forever for a silent server. The call's own
    # deadline bounds the total; these make a stuck connect or read fail (and be
    # retried) within it. sock_read starts once a request body is sent, so it never
    # cuts off a slow upload.
    options.setdefault(
        "requests_timeout",
        aiohttp.ClientTimeout(
            total=None, sock_connect=timeouts.connect, sock_read=timeouts.timeout
        ),
    )


def _filesystem(protocol: str, options: dict[str, Any], url: str, timeouts: Timeouts) -> Any:
    """The fsspec filesystem for ``protocol`` (fsspec caches instances per options)."""
    if protocol in ("gs", "gcs"):
        _gcs_options(options, timeouts)
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


# -- resumable uploads ----------------------------------------------------------------
_CTYPE = "application/octet-stream"


async def _initiate_upload(fs: Any, bucket: str, name: str) -> str:
    from gcsfs.core import initiate_upload

    return str(await initiate_upload(fs, bucket, name, _CTYPE))


# What an upload hands the socket at a time: its no-progress clock advances each time
# one is taken (aiohttp asks for the next once the socket has room again), so a part
# moving slowly keeps its upload alive and a stalled one ends it.
SLICE = MIN_PART
_BODY: Any = None  # the aiohttp Payload class below, made once aiohttp is imported


def _body(views: list[memoryview], clock: Clock) -> Any:
    """A request body streamed from ``views`` (the caller's own buffers: no copy),
    which can be sent again (gcsfs retries a request with the same body)."""
    global _BODY
    if _BODY is None:
        from aiohttp.payload import Payload

        class Body(Payload):
            _autoclose = True  # views of memory, nothing to close

            def __init__(self, views: list[memoryview], clock: Clock) -> None:
                super().__init__(views, content_type=_CTYPE)
                self._size = sum(len(v) for v in views)
                self._clock = clock

            async def write(self, writer: Any) -> None:
                for view in self._value:
                    for at in range(0, len(view), SLICE):
                        await writer.write(view[at : at + SLICE])
                        self._clock.progress()

            async def write_with_length(self, writer: Any, content_length: int | None) -> None:
                await self.write(writer)  # the length is ours: Content-Length is the size

            def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
                return b"".join(self._value).decode(encoding, errors)

        _BODY = Body
    return _BODY(views, clock)


def _after(views: list[memoryview], n: int) -> list[memoryview]:
    """``views`` without their first ``n`` bytes."""
    out = []
    for view in views:
        if n >= len(view):
            n -= len(view)
        else:
            out.append(view[n:])
            n = 0
    return out


async def _put_part(
    fs: Any,
    location: str,
    views: list[memoryview],
    offset: int,
    total: int | None,
    clock: Clock,
) -> dict[str, Any] | None:
    """Send one part of a resumable upload at ``offset``, streamed from ``views``;
    ``total`` (the object's size) on the last part only, which finalizes the object
    (its JSON is returned). gcsfs's ``upload_chunk`` needs the total on every part,
    which a stream does not know, and a buffer holding the whole part."""
    n = sum(len(v) for v in views)
    end = "*" if total is None else str(total)
    head = {
        "Content-Range": f"bytes {offset}-{offset + n - 1}/{end}" if n else f"bytes */{end}",
        "Content-Type": _CTYPE,
        "Content-Length": str(n),
    }
    data = _body(views, clock) if n else b""
    headers, text = await fs._call("POST", location, headers=head, data=data)
    if "Range" in headers:  # the server kept less than sent: send the rest again
        kept = int(headers["Range"].split("-")[1]) + 1
        if kept < offset + n:
            rest = _after(views, kept - offset)
            return await _put_part(fs, location, rest, kept, total, clock)
    return json.loads(text) if text else None


class _Parts:
    """Cuts a stream of chunks into parts of the sizes asked for, reading one chunk
    ahead to know whether a part is the last. A part is a list of views of the chunks
    (never a copy): it holds the memory of at most one part and one chunk."""

    def __init__(self, chunks: Iterable[Buffer]) -> None:
        self._chunks = iter(chunks)
        self._pending: list[memoryview] = []
        self._buffered = 0
        self._ended = False

    def take(self, n: int) -> tuple[list[memoryview], int, bool]:
        """The next part (``n`` bytes, fewer only when last), its size and whether it
        is the last."""
        while self._buffered <= n and not self._ended:
            chunk = next(self._chunks, None)
            if chunk is None:
                self._ended = True
            elif len(view := memoryview(chunk).cast("B")):
                self._pending.append(view)
                self._buffered += len(view)
        want = min(n, self._buffered)
        last = self._ended and self._buffered <= n
        self._buffered -= want
        part, filled = [], 0
        while filled < want:
            head = self._pending[0]
            take = min(len(head), want - filled)
            part.append(head[:take])
            filled += take
            if take == len(head):
                self._pending.pop(0)
            else:
                self._pending[0] = head[take:]
        return part, want, last


class FsspecStorage:
    """A directory on any fsspec filesystem; writes are synchronous and retried.

    ``storage_options`` (keyword arguments) override those from the URL query;
    ``timeout`` and ``write_timeout`` among them are ckptkit's own limits
    (:class:`~ckptkit.storage.deadlines.Timeouts`). Listings are always fetched
    fresh; :meth:`invalidate` also drops the cached file info that ``exists``/
    ``size``/``isdir`` may use, so that another process's new checkpoint becomes
    visible.
    """

    commit = "marker"
    parallel_writes = 4  # files of one checkpoint uploaded at once (atomic/strategies.py)
    attempts = 4  # tries per call, counting the first
    backoff = 0.5  # seconds before the first retry; doubles each time
    # The largest part of an upload or a streamed write: each part is a round trip (and
    # a copy of the whole upload so far on the emulator), so parts are large.
    part_size = 64 << 20
    range_size = 64 << 20  # the largest range of a ranged read (fewer round trips)

    def __init__(self, url: str, **storage_options: Any) -> None:
        if not isinstance(url, str) or "://" not in url:
            raise StorageError(f"{url!r}: not an fsspec URL (protocol://path)")
        base, _, query = url.partition("?")
        protocol = scheme_of(base)
        if not protocol:
            raise StorageError(f"{url}: malformed URL: expected protocol://path")
        options = {**_query_options(query), **storage_options}
        self.timeouts = Timeouts.take(options)
        self.url = url
        self.protocol = protocol
        self._base = base.rstrip("/")
        self._query = query
        self._fs = _filesystem(protocol, options, url, self.timeouts)
        self._root = _root_path(protocol, self._fs, base, url)
        self._bucket_ok = protocol not in _BUCKETED
        self._health = Health()  # shared with children (copy.copy)
        self._pace = Pace()  # likewise
        # Network filesystems get deadlines, ranged reads and acknowledged uploads;
        # in-process ones (memory://) are called directly.
        self._remote = bool(getattr(self._fs, "async_impl", False))

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

    # -- calls and errors ---------------------------------------------------------
    def _call(
        self,
        key: str,
        fn: str | Callable[..., Any],
        *args: Any,
        write: bool = False,
        clock: Clock | None = None,
        watched: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Call ``fn`` (a filesystem method's name, or a function) with retries, within
        the no-progress limit (``clock``, else a fresh one for this call). ``watched``:
        ``fn`` is a coroutine that advances ``clock`` itself as it makes progress (a
        streamed upload), stopped only once the clock runs out, not after a fixed
        time. A missing key or a precondition failure passes through; anything else
        is a StorageError naming the URL."""
        limit = self.timeouts.write_timeout if write else self.timeouts.timeout
        clock = clock or self._health.clock(limit)
        for attempt in range(1, self.attempts + 1):
            try:
                out = self._invoke(fn, args, kwargs, clock.remaining(), clock if watched else None)
            except (FileNotFoundError, FileExistsError, CkptError):
                self._health.mark(up=True)  # it answered
                raise
            except Exception as exc:
                left = clock.remaining()
                if left <= 0 or (is_transient(exc) and attempt == self.attempts):
                    self._health.mark(up=False)
                    raise self._unreachable(key, exc, clock, attempt, write) from exc
                if not is_transient(exc):
                    raise self._error(key, exc) from exc
                delay = min(30.0, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1)
                time.sleep(max(0.0, min(delay, left - 0.1)))
            else:
                self._health.mark(up=True)
                return out
        raise AssertionError("unreachable")  # attempts < 1

    def _invoke(
        self,
        fn: str | Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        left: float,
        watch: Clock | None = None,
    ) -> Any:
        """One try. On a network filesystem the coroutine runs on fsspec's loop under
        ``asyncio.wait_for`` (fsspec's ``timeout=``), or, with ``watch``, until that
        clock runs out: past the deadline it is cancelled, not left hanging."""
        if left <= 0:
            raise TimeoutError("no time left")
        if watch is not None and inspect.iscoroutinefunction(fn):
            from fsspec.asyn import sync

            return sync(self._fs.loop, until_stalled, watch, fn, *args, **kwargs)
        if isinstance(fn, str):
            method = getattr(self._fs, fn)
            # fsspec's blocking wrappers of coroutines take timeout= themselves.
            if self._remote and inspect.iscoroutinefunction(getattr(method, "__wrapped__", None)):
                return method(*args, timeout=left, **kwargs)
            return method(*args, **kwargs)
        if inspect.iscoroutinefunction(fn):
            from fsspec.asyn import sync

            return sync(self._fs.loop, fn, *args, timeout=left, **kwargs)
        return fn(*args, **kwargs)

    def _endpoint(self) -> str:
        with contextlib.suppress(Exception):
            return str(self._fs._location)  # gcsfs: endpoint_url, the emulator, or GCS
        return ""

    def _unreachable(
        self, key: str, exc: BaseException, clock: Clock, attempts: int, write: bool
    ) -> StorageError:
        """The endpoint did not answer (in time): say where, and what to do."""
        endpoint = self._endpoint()
        at = f" at {endpoint}" if endpoint else ""
        if clock.remaining() <= 0:
            what = "no part of the upload was acknowledged" if write else "no successful answer"
            what += f"{at} for {clock.limit:g} s"
        else:
            what = f"no successful answer{at}: gave up after {attempts} attempts ({_one_line(exc)})"
        if self.protocol in ("gs", "gcs") and os.environ.get("STORAGE_EMULATOR_HOST"):
            fix = "check STORAGE_EMULATOR_HOST (is the emulator running?), the network"
        elif self.protocol in ("gs", "gcs"):
            fix = "check the network, the endpoint_url option"
        else:
            fix = "check the endpoint, the network"
        env = self.timeouts.env_name(write)
        return StorageError(
            f"{self.url_of(key)}: {what}: {fix} and credentials, or set {env}=SECONDS "
            "to wait longer"
        )

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
        return StorageError(f"{url}: {_one_line(exc)}")

    def _bucket_missing(self) -> bool:
        """True when the URL's bucket does not exist (checked once it is needed)."""
        if self._bucket_ok:
            return False
        bucket = self._root.split("/", 1)[0]
        try:
            self._call("", "info", bucket)
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
        try:
            return self._call(key, "info", self._p(key))
        except FileNotFoundError:
            return None

    # -- reads ------------------------------------------------------------------
    def open_member(
        self, key: str, *, size: int | None = None, max_size: int | None = None
    ) -> Member:
        """Check the object's size now (one metadata request, fresh: not from a cached
        listing); reading fetches at most that size + 1 bytes, without asking the size
        again (object stores have no links to refuse)."""
        url = self.url_of(key)
        confined.key_parts(key, url)
        self._fs.invalidate_cache(self._p(key))
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
                if not self._remote:
                    return self._call(key, "cat_file", path, start=0, end=limit)
                return self._read_ranges(key, path, limit=limit, size=actual)
            except FileNotFoundError:
                raise self._not_found(key) from None

        return Member(url, actual, fetch=fetch)

    def read_bytes(self, key: str) -> bytes:
        path = self._p(key)
        try:
            if not self._remote:
                return self._call(key, "cat_file", path)
            return self._read_ranges(key, path)
        except FileNotFoundError:
            raise self._not_found(key) from None

    def _read_ranges(
        self, key: str, path: str, *, limit: int | None = None, size: int | None = None
    ) -> bytes:
        """Read in ranges sized to the speed seen so far: each must arrive within
        ``timeout``, so a large file on a slow link is read and a silent server is not
        waited for. The size is asked first, fresh (a cached one may be stale), and no
        range goes past it (the emulator drops a byte from such ranges). With ``limit``,
        at most that many bytes are fetched (a confined read's bound). ``size``: the
        size just asked (by :meth:`open_member`), not asked again."""
        if size is None:
            self._fs.invalidate_cache(path)
            size = int(self._call(key, "info", path)["size"])
        if limit is not None:
            size = min(size, limit)
        if size <= MIN_PART:  # one request, whatever the object is by then
            if limit is None:
                return self._call(key, "cat_file", path)
            return self._call(key, "cat_file", path, start=0, end=size)
        parts, offset, part = [], 0, MIN_PART
        clock = self._health.clock(self.timeouts.timeout)
        while offset < size:
            started = time.monotonic()
            end = min(size, offset + part)
            chunk = self._call(key, "cat_file", path, start=offset, end=end, clock=clock)
            if not chunk:
                break
            clock.progress()
            parts.append(chunk)
            offset += len(chunk)
            part = next_part(
                len(chunk),
                time.monotonic() - started,
                part,
                limit=self.timeouts.timeout,
                lo=MIN_PART,
                hi=max(MIN_PART, self.range_size),
            )
        data = b"".join(parts)
        if len(data) != size:
            raise StorageError(
                f"{self.url_of(key)}: read {len(data)} bytes of {size}: the object changed "
                "while being read; read it again"
            )
        return data

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
            if not self._remote:
                return float(self._fs.modified(self._p(key)).timestamp())
            info = self._info(key) or {}
            value = info.get("mtime") or info.get("LastModified") or info.get("updated")
            return float(value.timestamp()) if hasattr(value, "timestamp") else None
        except Exception:  # not every filesystem reports one
            return None

    def listdir(self, key: str = "") -> list[str]:
        path = self._p(key)
        # Always a fresh listing: this is how checkpoints written elsewhere are found.
        self._fs.invalidate_cache(path)
        try:
            entries = self._call(key, "ls", path, detail=False)
        except FileNotFoundError:
            if self._bucket_missing():
                raise self._missing_bucket_error() from None
            return []
        names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != path}
        return sorted(n for n in names if n)

    def find(self, key: str = "") -> list[str]:
        """The key (relative to ``key``) of every object below ``key``, in one listing: one
        request per 1,000 objects on an object store, where asking about each name
        would cost a request each."""
        path = self._p(key).rstrip("/")
        self._fs.invalidate_cache(path)
        try:
            found = self._call(key, "find", path, detail=False)
        except FileNotFoundError:
            return []
        prefix = path + "/"
        return sorted(f[len(prefix) :] for f in found if f.startswith(prefix))

    def sha256(self, key: str) -> str | None:
        return None  # GCS/S3 report md5/crc32c, not sha256: the reader hashes

    # -- writes -----------------------------------------------------------------
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key``. On GCS anything over 256 KiB is a resumable upload
        (:meth:`_upload`); elsewhere parts of :attr:`part_size` are streamed. Either way
        the object only appears once complete."""
        path = self._p(key)
        try:
            if self._resumable() and len(data) > MIN_PART:
                self._upload(key, path, (data,), len(data))
            elif len(data) <= self.part_size:
                self._call(key, "pipe_file", path, bytes(data), write=True)
            else:
                self._call(key, self._stream, path, data, write=True)
        except FileNotFoundError as exc:
            if self._bucket_missing():
                raise self._missing_bucket_error() from None
            raise self._error(key, exc) from exc

    def _resumable(self) -> bool:
        return self._remote and self.protocol in ("gs", "gcs") and hasattr(self._fs, "_call")

    def write_stream(self, key: str, chunks: Iterable[memoryview], size: int | None = None) -> None:
        """Write ``chunks``. On GCS, given its ``size``, a resumable upload that holds at
        most one part in memory; elsewhere (memory://, other stores) the chunks are
        joined and written with :meth:`write_bytes`, whose retries need the whole object."""
        if self._resumable() and size is not None and size > MIN_PART:
            try:
                self._upload(key, self._p(key), chunks, size)
            except FileNotFoundError as exc:
                if self._bucket_missing():
                    raise self._missing_bucket_error() from None
                raise self._error(key, exc) from exc
        else:
            self.write_bytes(key, b"".join(chunks))

    def _upload(
        self, key: str, path: str, chunks: Iterable[Buffer], size: int | None = None
    ) -> None:
        """The one GCS upload: ``chunks`` (any bytes-like objects, any sizes; ``size``
        their total when known) become one object, sent as a resumable upload in parts.

        Parts are sized to the speed seen (the first to the last upload's speed, then
        what a quarter of ``write_timeout`` moves, up to :attr:`part_size`): few round
        trips on a fast link (a checkpoint file of up to 64 MiB is a session and one
        part), each part acknowledged in time on a slow one. Each part is streamed
        from views of the chunks, never joined into a copy: a stream holds at most one
        part's views and one chunk, and a failed part is sent again from those views.
        The upload fails once no part was acknowledged, and no byte taken, for
        ``write_timeout`` (retries included), however long the whole upload takes."""
        bucket, name, _ = self._fs.split_path(path)
        # gcsfs's own writers do this; a cached listing of the parent would hide the
        # new object from info()/exists().
        self._fs.invalidate_cache(path)
        clock = self._health.clock(self.timeouts.write_timeout)
        hi = max(MIN_PART, self.part_size // MIN_PART * MIN_PART)
        location = self._call(
            key, _initiate_upload, self._fs, bucket, name, write=True, clock=clock
        )
        clock.progress()
        parts = _Parts(chunks)
        offset, result = 0, None
        part = self._pace.first_part(limit=clock.limit, lo=MIN_PART, hi=hi)
        while True:
            views, n, last = parts.take(part)
            total = offset + n if last else None
            if size is not None and (offset + n > size or (last and total != size)):
                raise StorageError(
                    f"{self.url_of(key)}: the data is not the {size} bytes announced "
                    "(it changed while being written); write it again"
                )
            started = time.monotonic()
            try:
                result = self._call(
                    key,
                    _put_part,
                    self._fs,
                    location,
                    views,
                    offset,
                    total,
                    clock,
                    write=True,
                    clock=clock,
                    watched=True,
                )
            except FileNotFoundError as exc:  # the session, not the object (404)
                if self._bucket_missing():
                    raise self._missing_bucket_error() from None
                raise WriteLost(
                    f"{self.url_of(key)}: the store lost the upload after {offset} bytes "
                    "(its session expired, or the server restarted); write it again"
                ) from exc
            seconds = time.monotonic() - started
            clock.progress()
            self._pace.observe(n, seconds)
            offset += n
            if last:
                break
            part = next_part(n, seconds, part, limit=clock.limit, lo=MIN_PART, hi=hi)
        self._fs.invalidate_cache(path)
        if not isinstance(result, dict) or int(result.get("size", -1)) != offset:
            raise StorageError(
                f"{self.url_of(key)}: the upload ended without the server confirming "
                f"{offset} bytes; write it again"
            )

    def _parts(self, data: bytes) -> Iterator[memoryview]:
        view = memoryview(data)
        for offset in range(0, len(view), self.part_size):
            yield view[offset : offset + self.part_size]

    def _stream(self, path: str, data: bytes) -> None:
        f = self._fs.open(path, "wb", block_size=self.part_size)
        try:
            for part in self._parts(data):
                f.write(part)
            f.close()
        except BaseException:
            # Drop the half-written file so that neither close() nor the garbage
            # collector finalizes it: an unfinished multipart upload never becomes
            # an object.
            with contextlib.suppress(Exception):
                f.discard()
            with contextlib.suppress(Exception):
                f.closed = True
            raise

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Best effort: check, then create with the store's precondition where it has
        one (GCS ``ifGenerationMatch=0``; the emulator ignores it)."""
        path = self._p(key)
        self._fs.invalidate_cache(path)  # ask the store, not a listing cached earlier
        if self.exists(key):
            return False
        try:
            try:
                self._call(key, "pipe_file", path, bytes(data), mode="create", write=True)
            except StorageError as exc:
                if not isinstance(exc.__cause__, TypeError):
                    raise
                self._call(key, "pipe_file", path, bytes(data), write=True)  # no modes
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
        self._call(key, "makedirs", self._p(key), exist_ok=True)

    def delete(self, key: str, recursive: bool = False) -> None:
        with contextlib.suppress(FileNotFoundError):  # gone already, or meanwhile
            self._delete(key, recursive)
        self._fs.invalidate_cache(self._p(key))

    def _delete(self, key: str, recursive: bool) -> None:
        path = self._p(key)
        if self.protocol in _BUCKETED and "/" in path:
            # No metadata request first (rotation deletes on every save): a file is one
            # DELETE, a tree one listing (which holds a file at ``key`` too) and a
            # DELETE per object. Only a file that is not there is asked about again,
            # in case it is a prefix (not removed without ``recursive``).
            if recursive:
                self._fs.invalidate_cache(path)  # list what is there now
                found = self._call(key, "find", path)
                if found:
                    self._call(key, "rm", found)
                return
            with contextlib.suppress(FileNotFoundError):
                self._call(key, "rm_file", path)
                return
        info = self._info(key)
        if info is None:
            return
        if info.get("type") == "directory":
            if not recursive:
                if self.listdir(key):
                    raise StorageError(f"{self.url_of(key)}: directory not empty")
                if self.protocol not in _BUCKETED:
                    self._call(key, "rmdir", path)
                return
            if self.protocol in _BUCKETED and "/" not in path:
                # rm(bucket, recursive=True) would delete the bucket itself.
                self._call(key, "rm", self._call(key, "find", path))
            else:
                self._call(key, "rm", path, recursive=True)
        else:
            self._call(key, "rm_file", path)

    def rename(self, src: str, dst: str) -> None:
        """Copy-then-delete (object stores cannot rename): not atomic, and slow on GCS.
        Only the ``rename`` commit strategy uses it, which this backend does not declare."""
        self._call(dst, "mv", self._p(src), self._p(dst), recursive=True)

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
