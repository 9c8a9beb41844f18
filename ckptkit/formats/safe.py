"""Loading torch and safetensors files without executing anything they contain.

Every torch file goes through ``torch.load(weights_only=True)``. Old checkpoints often
hold numpy scalars (``best_score = np.float64(...)``), arrays and ``np.random.get_state()``
tuples, which that loader refuses; we admit exactly the numpy pieces those need (see
``_numpy_allowlist``) for the duration of one load, then convert every numpy value to
plain Python or torch (``to_plain``), so callers only ever see tensors and primitives.
Anything else is an ``UnsafeCheckpointError`` naming the global; nothing is executed.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ckptkit.errors import (
    CheckpointNotFoundError,
    CkptError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    UnsafeCheckpointError,
)
from ckptkit.formats import pickles

log = logging.getLogger(__name__)

_ZIP_MAGIC = b"PK\x03\x04"
_UNSAFE_FIX = "re-save it with plain types, or pass trust=True if you trust the file's author"

# numpy dtypes whose scalars/arrays we admit: fixed-size numbers and bools, whose pickled
# payload is raw bytes. Object, string, void (structured) and datetime dtypes are left out:
# none is needed for weights, metrics or RNG state, and object dtypes carry nested pickles.
_NUMPY_TYPES = (
    np.bool_,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.complex64,
    np.complex128,
)


def _numpy_allowlist() -> list[Any]:
    """The globals a numpy 1.x or 2.x pickle of the types above names, and nothing more.

    - ``numpy.{core,_core}.multiarray.scalar``: rebuilds a numpy scalar from (dtype, bytes).
      numpy 2 renamed ``numpy.core`` to ``numpy._core``; files written by either name it by
      its own path, so both paths map to the one function (taken from ``__reduce__``, so
      we never import the deprecated ``numpy.core`` shim).
    - ``numpy.{core,_core}.multiarray._reconstruct`` and ``numpy.ndarray``: an array pickles
      as ``_reconstruct(ndarray, (0,), b"b")`` then ``ndarray.__setstate__`` with raw bytes.
    - ``numpy.dtype``: every scalar and array names its dtype as ``dtype("f8", False, True)``.
    - the dtype classes (``numpy.dtypes.Float64DType``... in numpy >= 1.25): never named in
      the pickle, but torch only runs ``__setstate__`` (pickle BUILD) on allowlisted types,
      and the dtype above is BUILT with its byte order.
    """
    scalar = np.float64(0).__reduce__()[0]
    reconstruct = np.zeros(1).__reduce__()[0]
    allow: list[Any] = [np.dtype, np.ndarray]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allow.append((scalar, f"{module}.scalar"))
        allow.append((reconstruct, f"{module}._reconstruct"))
    allow.extend(type(np.dtype(t)) for t in _NUMPY_TYPES)
    return allow


NUMPY_ALLOWLIST: list[Any] = _numpy_allowlist()

# torch's allowlist is one process-wide set; a refcount lets concurrent loads share it
# (one load leaving must not pull the entries from under another) and leaves entries a
# user added with torch.serialization.add_safe_globals in place.
_allow_lock = threading.Lock()
_allow_users = 0
_allow_added: list[Any] = []


# (callable, "dotted.name") allowlist entries arrived in torch 2.6; on older torch numpy
# files are refused as unsafe rather than misread.
_TORCH_HAS_NAMED_ALLOWLIST = torch.__version__ >= "2.6"


@contextmanager
def _allowlisted() -> Iterator[None]:
    global _allow_users, _allow_added
    if not _TORCH_HAS_NAMED_ALLOWLIST:
        yield
        return
    with _allow_lock:
        if _allow_users == 0:
            present = set(torch.serialization.get_safe_globals())
            _allow_added = [g for g in NUMPY_ALLOWLIST if g not in present]
            torch.serialization.add_safe_globals(_allow_added)
        _allow_users += 1
    try:
        yield
    finally:
        with _allow_lock:
            _allow_users -= 1
            if _allow_users == 0:
                _remove_safe_globals(_allow_added)
                _allow_added = []


def _remove_safe_globals(entries: list[Any]) -> None:
    # torch has no public remove; safe_globals() itself uses this private helper.
    from torch._weights_only_unpickler import _remove_safe_globals as remove

    remove(entries)


# What torch's weights-only unpickler says when a file needs something not allowlisted.
_UNSAFE_PATTERNS = (
    re.compile(r"Unsupported global: GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module \S+ is blocked"),
    re.compile(r"Can only (?:build|create new object)[^<]*but got <class '([^']+)'>"),
    re.compile(r"unrecognized function (.+?)(?: which belongs|$)", re.MULTILINE),
)


def unsafe_global(message: str) -> str | None:
    """The global named in torch's weights-only error message, or None if it names none."""
    for pattern in _UNSAFE_PATTERNS:
        m = pattern.search(message)
        if m:
            return m.group(1).strip()
    return None


def safe_torch_load(
    data: pickles.Source, *, source: str, trust: bool = False, map_location: Any = "cpu"
) -> Any:
    """Load a ``torch.save`` file (bytes, a local path, or an open binary file) without
    running pickled code.

    Returns the object with numpy values turned into Python numbers / tensors and
    allowlisted config objects (``pickles.CONFIG_CLASSES``) turned into plain dicts, lists
    and strings. Raises ``UnsafeCheckpointError`` naming every global the file needs beyond
    the allowlist (found from the pickle's opcodes, before anything is loaded),
    ``CorruptCheckpointError`` when it cannot be decoded, ``CheckpointNotFoundError`` for a
    missing path. ``trust=True`` unpickles everything (the file can run any code): only for
    files whose author you trust.
    """
    try:
        if trust:
            return _trusted_load(data, source, map_location)
        with _allowlisted():
            restricted = _plan(data, source)
            # Never torch.load(mmap=True): the tensors it returns stay backed by the
            # file's pages for as long as they live, so a file truncated or rewritten in
            # place afterwards (torch.save over the same name truncates it first; a sync
            # client) kills the process with SIGBUS on their next use, long after the
            # load returned. Each storage is read into fresh memory instead (one copy);
            # a file that shrinks meanwhile is a short read: CorruptCheckpointError.
            # Native checkpoints are mapped only under a read lease (storage/mapping.py).
            with pickles.opened(data) as f:
                if restricted is None:
                    obj = torch.load(f, map_location=map_location, weights_only=True)
                else:  # our restricted unpickler decides every global: still no code runs
                    obj = torch.load(
                        f,
                        map_location=map_location,
                        weights_only=False,
                        pickle_module=pickles.pickle_module(restricted),
                    )
                    obj = pickles.plain(obj)
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(f"{source}: no such file") from exc
    except MemoryError:
        raise
    except CkptError:
        raise
    except Exception as exc:
        raise _load_error(exc, source) from exc
    return to_plain(obj, source=source)


@dataclass
class Seen:
    """What the loads inside ``recording()`` found: globals outside the allowlist (only
    loaded under ``trust=True``; otherwise the load was refused) and allowlisted config
    classes read as plain data."""

    unsafe: list[str] = field(default_factory=list)
    configs: list[str] = field(default_factory=list)

    def add(self, bucket: list[str], names: list[str]) -> None:
        bucket.extend(n for n in names if n not in bucket)


_seen: ContextVar[Seen | None] = ContextVar("ckptkit_seen_globals", default=None)


@contextmanager
def recording() -> Iterator[Seen]:
    """Collect the globals every ``safe_torch_load`` in this block met (for ``inspect``)."""
    seen = Seen()
    token = _seen.set(seen)
    try:
        yield seen
    finally:
        _seen.reset(token)


def _globals_of(data: pickles.Source) -> tuple[list[str], int] | None:
    """The globals a torch file names and its pickle protocol, or None when the bytes are
    not a readable torch pickle (torch.load then says how it is damaged)."""
    try:
        pkl, count = pickles.torch_pickle(data)
        names = pickles.scan_globals(pkl, pickles=count)
    except (ValueError, OSError):
        return None
    return names, pkl[1] if pkl[:1] == b"\x80" and len(pkl) > 1 else 0


def _plan(data: pickles.Source, source: str) -> dict[str, Any] | None:
    """Refuse a file naming a global outside the allowlist, before anything is loaded.
    Returns None when torch's weights-only loader can read it (tensor globals only,
    protocol 2 or 3), else the allowlist for our restricted unpickler."""
    scanned = _globals_of(data)
    if scanned is None:
        return None
    names, proto = scanned
    tensor = pickles.tensor_globals()
    refused = pickles.unlisted(names, [*tensor, *pickles.CONFIG_GLOBALS])
    if refused:
        raise unsafe_error(source, refused)
    configs = [n for n in names if n in pickles.CONFIG_GLOBALS and n not in tensor]
    seen = _seen.get()
    if seen is not None:
        seen.add(seen.configs, [n for n in configs if n in _CONFIG_NAMES])
    if not configs and proto in (2, 3):
        return None
    return {**pickles.CONFIG_GLOBALS, **tensor}


_CONFIG_NAMES = {
    n
    for n, v in pickles.CONFIG_GLOBALS.items()
    if n.split(".")[0] in ("argparse", "types", "pathlib")
    or n.endswith(("DictConfig", "ListConfig"))
}


def unsafe_error(source: str, names: list[str]) -> UnsafeCheckpointError:
    """The refusal of a file that names ``names``: every one of them, and why."""
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    err = UnsafeCheckpointError(
        f"{source}: refusing to unpickle {shown} (not on the allowlist of tensors, numbers "
        f"and config classes; loading it could run code): {_UNSAFE_FIX}"
    )
    err.globals = list(names)  # type: ignore[attr-defined]
    return err


def _trusted_load(data: pickles.Source, source: str, map_location: Any) -> Any:
    scanned = _globals_of(data)
    names = pickles.unlisted(scanned[0], pickles.tensor_globals()) if scanned else []
    what = f" ({', '.join(names[:8])})" if names else ""
    msg = (
        f"executing pickled code from {source}{what} (trust=True): only do this for files you trust"
    )
    seen = _seen.get()
    if seen is not None:
        seen.add(seen.unsafe, names)
    from ckptkit.run import warn  # run imports this module: import at call time

    warn(msg, UserWarning)
    try:
        with pickles.opened(data) as f:
            obj = torch.load(f, map_location=map_location, weights_only=False)
    except (ImportError, AttributeError) as exc:
        # A pickled object whose class the loading process cannot import (a whole
        # torch.save(model) from a script's __main__...): the file is fine, the code is not here.
        raise IncompatibleCheckpointError(
            f"{source}: trust=True: the file pickles objects whose code is not importable "
            f"here ({type(exc).__name__}: {str(exc)[:120]}): load it where that code is "
            "importable and save model.state_dict() instead"
        ) from exc
    return to_plain(obj, source=source)


def _load_error(exc: Exception, source: str) -> Exception:
    if isinstance(exc, pickles.Refused):
        return unsafe_error(source, [exc.what])
    text = str(exc)
    name = unsafe_global(text)
    if name is not None:
        return UnsafeCheckpointError(
            f"{source}: refusing to unpickle {name} (it could run code when loaded): {_UNSAFE_FIX}"
        )
    if "Attempting to deserialize object on" in text:
        return IncompatibleCheckpointError(
            f"{source}: saved on a device this machine lacks: load with map_location='cpu'"
        )
    # torch.load fails on damaged bytes with many types (RuntimeError from the zip reader,
    # EOFError, ValueError, UnpicklingError 'Unsupported operand', UnicodeDecodeError...).
    first = text.strip().splitlines()[0] if text.strip() else ""
    if "WeightsUnpickler error" in text:
        first = _weights_error_detail(text) or first
    first = first.split(". ")[0]  # torch appends paragraphs of advice
    detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return CorruptCheckpointError(
        f"{source}: cannot be decoded as a torch checkpoint (truncated or damaged?): {detail[:200]}"
    )


def _weights_error_detail(text: str) -> str | None:
    # torch wraps the real reason in a paragraph of advice; keep only the reason.
    tail = text.split("WeightsUnpickler error:", 1)[1]
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    return lines[0] if lines else None


def safe_safetensors_load(data: bytes | str, *, source: str) -> dict[str, torch.Tensor]:
    """Load a safetensors file (bytes, or a local path) onto the CPU, into fresh memory:
    never ``load_file``, whose tensors would stay backed by the mapped file (see
    ``safe_torch_load``). Checkpoint files are read with ``native.read_safetensors`` instead, which
    needs no buffer of the whole file."""
    from safetensors.torch import load

    try:
        if isinstance(data, str):
            with open(data, "rb") as f:
                data = f.read()
        return load(bytes(data))
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(f"{source}: no such file") from exc
    except MemoryError:
        raise
    except Exception as exc:  # SafetensorError, or OSError/ValueError on damaged headers
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CorruptCheckpointError(
            f"{source}: cannot be decoded as safetensors (truncated or damaged?): {first[:200]}"
        ) from exc


def to_plain(obj: Any, *, source: str = "checkpoint") -> Any:
    """``obj`` with numpy values replaced: scalars by Python numbers, numeric arrays by
    tensors (sharing memory), dtypes by their name. Containers are rebuilt only where
    something changed, so a large state dict is returned as the same object."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return _array_to_tensor(obj, source)
    if isinstance(obj, np.dtype):
        return str(obj)
    if isinstance(obj, dict):
        items = {k: to_plain(v, source=source) for k, v in obj.items()}
        if all(items[k] is v for k, v in obj.items()):
            return obj
        out = OrderedDict(items) if isinstance(obj, OrderedDict) else items
        return out
    if isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        seq = [to_plain(v, source=source) for v in obj]
        if all(a is b for a, b in zip(seq, obj, strict=True)):
            return obj
        return seq if isinstance(obj, list) else tuple(seq)
    return obj


def _array_to_tensor(arr: np.ndarray, source: str) -> torch.Tensor:
    # Only reachable for crafted files (the allowlist never BUILDs other dtypes), but an
    # object array made without BUILD must not reach the caller.
    if arr.dtype.kind not in "biufc":
        raise UnsafeCheckpointError(
            f"{source}: refusing a numpy array of dtype {arr.dtype} (only numeric arrays are "
            f"loaded): {_UNSAFE_FIX}"
        )
    if not arr.flags.writeable or not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="), copy=True)
    return torch.from_numpy(arr)
