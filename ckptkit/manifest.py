"""What a committed checkpoint is: a directory whose ``manifest.json`` (written last)
lists every file with its size and sha256, plus the checkpoint's metadata.

A directory without a manifest that parses and verifies does not exist for readers.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import platform
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ckptkit.errors import ConfigError, CorruptCheckpointError, IncompatibleCheckpointError
from ckptkit.storage.names import UnsafeNameError, check_member_name

FORMAT = "ckptkit/2"
FORMAT_1 = "ckptkit/1"  # sha256 per file, state.pt: still read (docs/FORMAT.md)
MANIFEST = "manifest.json"
# The one file that holds several state entries (formats/native.py writes it):
# ``state.pt`` in ckptkit/1, ``state.json`` (the state tree) in ckptkit/2.
STATE_FILE = "state.pt"
TREE_FILE = "state.json"
UPGRADE = "written by a newer ckptkit: upgrade ckptkit (pip install -U ckptkit)"

# Name order is step order: zero-padded step, then an optional revision for a
# second save at the same step (the older revision is deleted after the commit).
_NAME = re.compile(r"^step-(\d{12})(?:-r(\d+))?$")


def checkpoint_name(step: int, revision: int = 0) -> str:
    if not 0 <= step < MAX_STEP:
        raise ConfigError(
            f"step must be in [0, 10**12) (the width of checkpoint names), got {step}"
        )
    return f"step-{step:012d}" + (f"-r{revision}" if revision else "")


def parse_name(name: str) -> tuple[int, int] | None:
    """``(step, revision)`` for a checkpoint directory name, else None."""
    m = _NAME.match(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_hasher() -> Any:
    """The integrity hash of a ckptkit/2 file (xxh3-128, fed chunk by chunk): about
    20 GB/s on one core, so checking never holds back the disk (sha256: ~1.4 GB/s)."""
    import xxhash

    return xxhash.xxh3_128()


def versions() -> dict[str, str]:
    import numpy
    import torch

    from ckptkit import __version__

    return {
        "ckptkit": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def config_hash(config: dict[str, Any] | None) -> str | None:
    if config is None:
        return None
    canon = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return sha256_bytes(canon.encode())[:16]


def metric_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``save``'s metrics as the manifest holds them: floats (tensors and numpy scalars
    convert); anything else is a ConfigError naming the metric."""
    if not isinstance(metrics, Mapping):
        raise ConfigError(f"metrics must be a dict of name -> number, got {_clip(metrics)}")
    out: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of many values
            raise ConfigError(f"metrics[{key!r}] must be a number, got {_clip(value)}") from None
    return out


def epoch_value(epoch: Any) -> int | None:
    """``save``'s epoch as the manifest holds it: None or an int (numpy and tensor
    integers convert); anything else is a ConfigError."""
    if epoch is None:
        return None
    try:
        if isinstance(epoch, bool):
            raise TypeError
        return operator.index(epoch)
    except TypeError:
        raise ConfigError(f"epoch must be an int or None, got {_clip(epoch)}") from None


@dataclass
class FileEntry:
    """One data file: its size and hash (``xxh3`` in ckptkit/2, ``sha256`` in ckptkit/1)."""

    size: int
    sha256: str | None = None
    xxh3: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"size": self.size}
        out.update({k: v for k, v in (("sha256", self.sha256), ("xxh3", self.xxh3)) if v})
        return out


@dataclass
class Manifest:
    """The commit record of one checkpoint. Readers trust nothing without it.

    :meth:`from_bytes` checks every field's type and range (see docs/FORMAT.md) and
    :meth:`to_bytes` refuses to write anything :meth:`from_bytes` would refuse.
    """

    step: int
    files: dict[str, FileEntry]
    entries: dict[str, str]  # state key -> file holding it (see docs/FORMAT.md)
    epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    is_best: bool = False
    created: float = field(default_factory=time.time)
    config: dict[str, Any] | None = None
    config_hash: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    format: str = FORMAT
    # ckptkit/2: ``{"<folder>/": layout name}`` for entries stored as a folder (a layout
    # later versions add, e.g. DCP shards); written only when there is one.
    layouts: dict[str, str] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """The manifest as written; ConfigError (nothing written) when a value could not
        be read back: a non-finite metric, a step past the name width, a NaN in config..."""
        try:
            raw = asdict(self)
            raw["files"] = {k: v.to_json() for k, v in self.files.items()}
            if not self.layouts:
                del raw["layouts"]
            _typed(raw)
            data = json.dumps(raw, indent=1, sort_keys=True, default=str, allow_nan=False)
            _typed(_parse(data.encode()))  # what a reader will see, by the reader's rules
        except (_Invalid, ValueError, TypeError, RecursionError) as exc:
            raise ConfigError(
                f"cannot save step {_clip(self.step)}: {_clip(exc, 200)} (the manifest would be "
                "unreadable); pass finite numbers as metrics and a JSON-able config/metadata"
            ) from None
        return data.encode()

    @classmethod
    def from_bytes(cls, data: bytes, source: str, *, name: str | None = None) -> Manifest:
        """Parse and type-check a manifest; CorruptCheckpointError (one line naming the
        field) for anything malformed. ``name``: the checkpoint directory's name; when it
        is a ``step-*`` name, the manifest's step must be the one it names."""
        try:
            raw = _parse(data)
            _refuse_newer(raw, source)
            manifest = _typed(raw)
            parsed = parse_name(name) if name else None
            if parsed is not None and parsed[0] != manifest.step:
                raise _Invalid(f"step {manifest.step} in a directory named for step {parsed[0]}")
        except _Invalid as exc:
            raise CorruptCheckpointError(
                f"{source}: unreadable manifest ({exc}); the checkpoint is damaged: "
                "restore an older one, or delete it"
            ) from None
        return manifest

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files.values())


def check_manifest_size(size: int, source: str) -> None:
    """Refuse a manifest over MAX_MANIFEST_BYTES before reading it (its real size is not
    said: it may be a file outside the checkpoint that the name leads to)."""
    if size > MAX_MANIFEST_BYTES:
        raise CorruptCheckpointError(
            f"{source}: unreadable manifest (larger than the {MAX_MANIFEST_BYTES >> 20} MiB "
            "limit); the checkpoint is damaged: restore an older one, or delete it"
        )


# -- parsing ---------------------------------------------------------------------
# Limits: a manifest is a few KB; these bound what a hostile one can cost a reader.
MAX_MANIFEST_BYTES = 16 << 20
MAX_STEP = 10**12  # exclusive: checkpoint names hold 12 digits, and name order is step order
MAX_SIZE = 2**63 - 1  # a file size any filesystem can report
_MAX_DEPTH = 64  # nesting of config and metadata values
_HEX = re.compile(r"^[0-9a-f]+$")
_FIELDS = ("format", "step", "files", "entries", "epoch", "metrics", "is_best", "created")
_FIELDS += ("config", "config_hash", "metadata", "versions")


class _Invalid(ValueError):
    """What is wrong with a manifest, in words (the caller adds where and what to do)."""


def _clip(value: object, limit: int = 40) -> str:
    """``repr`` of a value from a manifest, cut short: messages stay one short line."""
    text = str(value) if isinstance(value, str | BaseException) else repr(value)
    text = text[: limit + 1]
    # Control characters (newlines, terminal escapes) are shown escaped, never sent raw.
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Invalid(f"duplicate key {_clip(key)!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _Invalid(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as inf
        raise _Invalid(f"{_clip(text)} is not a finite number")
    return value


def _parse(data: bytes) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity, bounded size and depth."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise _Invalid(f"larger than the {MAX_MANIFEST_BYTES >> 20} MiB limit")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _Invalid("not UTF-8 text") from None
    try:
        return json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
            parse_float=_finite_float,
        )
    except _Invalid:
        raise
    except RecursionError:
        raise _Invalid("nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and ints past Python's digit limit
        raise _Invalid(f"not JSON: {_clip(exc, 80)}") from None


def _int(value: Any, what: str, top: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):  # JSON true is not a step
        raise _Invalid(f"{what} must be an int, got {_clip(value)}")
    if not 0 <= value < top:
        raise _Invalid(f"{what} {_clip(value)} is out of range [0, {top})")
    return value


def _number(value: Any, what: str) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _Invalid(f"{what} must be a number, got {_clip(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise _Invalid(f"{what} {_clip(value)} is not a finite number")
    return number


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"{what} must be a string, got {_clip(value)}")
    return value


def _object(value: Any, what: str, *, str_keys: bool = True) -> dict[Any, Any]:
    # Parsed JSON always has string keys; a writer's metrics must too (they are read
    # back as strings), while config/metadata keys are written with str() like values.
    if not isinstance(value, dict):
        raise _Invalid(f"{what} must be a JSON object, got {_clip(value)}")
    for key in value if str_keys else ():
        _str(key, f"a key of {what}")
    return value


def _hex(value: Any, what: str, length: int) -> str:
    if not isinstance(value, str) or len(value) != length or not _HEX.match(value):
        raise _Invalid(f"{what} must be {length} lowercase hex digits, got {_clip(value)}")
    return value


def _plain(value: Any, what: str) -> None:
    """A JSON value (config, metadata): finite numbers, bounded depth (iteratively: a
    deep value must not exhaust the stack of the code that checks it)."""
    todo = [(value, 0)]
    while todo:
        item, depth = todo.pop()
        if depth > _MAX_DEPTH:
            raise _Invalid(f"{what} is nested more than {_MAX_DEPTH} levels deep")
        if isinstance(item, float) and not math.isfinite(item):
            raise _Invalid(f"{what} holds {item}, not a finite number")
        if isinstance(item, dict):
            todo.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list | tuple):
            todo.extend((v, depth + 1) for v in item)


_FORMAT_NUMBER = re.compile(r"^ckptkit/(\d{1,9})$")


def _refuse_newer(raw: Any, source: str) -> None:
    """IncompatibleCheckpointError for a manifest of a format newer than this reader's
    (``ckptkit/3``...): it is not damaged, this ckptkit is too old for it."""
    fmt = raw.get("format") if isinstance(raw, dict) else None
    m = _FORMAT_NUMBER.match(fmt) if isinstance(fmt, str) else None
    if m and int(m.group(1)) > int(FORMAT.rsplit("/", 1)[1]):
        raise IncompatibleCheckpointError(f"{source}: format {fmt} was {UPGRADE}")


def _files(value: Any, fmt: str) -> dict[str, FileEntry]:
    # ckptkit/1: plain names, sha256; ckptkit/2: one sub-folder level allowed, xxh3.
    hash_key, length = ("sha256", 64) if fmt == FORMAT_1 else ("xxh3", 32)
    out: dict[str, FileEntry] = {}
    for name, entry in _object(value, "files").items():
        try:
            check_member_name(name, allow_subdirs=fmt != FORMAT_1)
            if name.count("/") > 1:
                raise UnsafeNameError(f"{name!r} is more than one sub-folder deep")
        except UnsafeNameError as exc:
            raise _Invalid(f"unsafe file name: {_clip(exc, 80)}") from None
        if name == MANIFEST:
            raise _Invalid(f"files lists {MANIFEST} (the manifest does not list itself)")
        what = f"files[{_clip(name)!r}]"
        entry = _object(entry, what)
        if set(entry) != {"size", hash_key}:
            raise _Invalid(
                f"{what} must have exactly 'size' and {hash_key!r}, got {_clip(sorted(entry))}"
            )
        out[name] = FileEntry(
            size=_int(entry["size"], f"{what}.size", MAX_SIZE),
            **{hash_key: _hex(entry[hash_key], f"{what}.{hash_key}", length)},
        )
    return out


def is_folder(fname: str) -> bool:
    """An ``entries`` value naming a folder of files (a layout), not one file."""
    return fname.endswith("/")


def _entries(value: Any, files: dict[str, FileEntry], fmt: str) -> dict[str, str]:
    entries = _object(value, "entries")
    shared = STATE_FILE if fmt == FORMAT_1 else TREE_FILE
    holders: dict[str, str] = {}
    for key, fname in entries.items():
        what = f"entries[{_clip(key)!r}]"
        _str(fname, what)
        if fmt != FORMAT_1 and is_folder(fname):
            try:
                check_member_name(fname[:-1])
            except UnsafeNameError as exc:
                raise _Invalid(f"{what}: unsafe folder name: {_clip(exc, 80)}") from None
            if not any(f.startswith(fname) for f in files):
                raise _Invalid(f"{what} names the folder {_clip(fname)!r}, which lists no file")
        elif fname not in files:
            raise _Invalid(f"{what} names {_clip(fname)!r}, a file the manifest does not list")
        elif fmt != FORMAT_1 and fname != TREE_FILE:  # tensor files are the tree's to name
            raise _Invalid(f"{what} names {_clip(fname)!r}: not {TREE_FILE} nor a folder")
        # Only the shared state file and a layout's folder (several ShardedStates in one
        # DCP directory) hold several entries; any other file is one entry's.
        if fname != shared and not is_folder(fname) and holders.setdefault(fname, key) != key:
            raise _Invalid(f"{_clip(fname)!r} is named by two entries")
    named = set(entries.values())
    folders = {f for f in named if is_folder(f)}
    unnamed = sorted(
        f
        for f in set(files) - named
        if not any(f.startswith(d) for d in folders) and not _tensor_file(f, fmt, shared, named)
    )
    if unnamed:  # the writer lists only files it decodes from: a stray one was added later
        raise _Invalid(f"files lists {_clip(unnamed[0])!r}, which no entry names")
    return entries


def _tensor_file(fname: str, fmt: str, shared: str, named: set[str]) -> bool:
    # ckptkit/2's tensor files are named by the state tree (which the reader checks
    # refers to each of them), not by an entry.
    return fmt != FORMAT_1 and shared in named and "/" not in fname and fname.endswith(TENSORS)


TENSORS = ".safetensors"


def _layouts(value: Any, entries: dict[str, str]) -> dict[str, str]:
    layouts = _object(value, "layouts")
    folders = {f for f in entries.values() if is_folder(f)}
    for folder, name in layouts.items():
        if folder not in folders:
            raise _Invalid(f"layouts names {_clip(folder)!r}, a folder no entry names")
        if not _str(name, f"layouts[{_clip(folder)!r}]"):
            raise _Invalid(f"layouts[{_clip(folder)!r}] is empty")
    missing = sorted(folders - set(layouts))
    if missing:
        raise _Invalid(f"the folder {_clip(missing[0])!r} has no layout")
    return layouts


def _typed(raw: Any) -> Manifest:
    """A Manifest from parsed JSON, every field checked (see docs/FORMAT.md)."""
    raw = _object(raw, "the manifest")
    fmt = raw.get("format")
    if fmt not in (FORMAT, FORMAT_1):
        raise _Invalid(f"format {_clip(fmt)} is not {FORMAT!r} (nor {FORMAT_1!r})")
    known = (*_FIELDS, "layouts") if fmt == FORMAT else _FIELDS
    unknown = sorted(set(raw) - set(known))
    if unknown:  # a newer format must change "format": an unknown field is not ignored
        raise _Invalid(f"unknown field {_clip(unknown[0])!r}")
    missing = [f for f in _FIELDS if f not in raw]
    if missing:
        raise _Invalid(f"no {missing[0]!r} field")
    files = _files(raw["files"], fmt)
    entries = _entries(raw["entries"], files, fmt)
    metrics = _object(raw["metrics"], "metrics")
    config, config_hash_ = raw["config"], raw["config_hash"]
    if config is not None:
        _plain(_object(config, "config", str_keys=False), "config")
    if config_hash_ is not None:
        _hex(config_hash_, "config_hash", 16)
    if config_hash_ != config_hash(config):
        raise _Invalid("config_hash does not match config")
    metadata = _object(raw["metadata"], "metadata", str_keys=False)
    _plain(metadata, "metadata")
    for key in ("run_name", "best_metric"):
        if metadata.get(key) is not None:
            _str(metadata[key], f"metadata.{key}")
    if metadata.get("mode", "min") not in ("min", "max"):
        raise _Invalid(f"metadata.mode must be 'min' or 'max', got {_clip(metadata['mode'])}")
    is_best = raw["is_best"]
    if not isinstance(is_best, bool):
        raise _Invalid(f"is_best must be true or false, got {_clip(is_best)}")
    epoch = raw["epoch"]
    return Manifest(
        step=_int(raw["step"], "step", MAX_STEP),
        files=files,
        entries=entries,
        epoch=None if epoch is None else _int(epoch, "epoch", MAX_SIZE),
        metrics={k: _number(v, f"metrics[{_clip(k)!r}]") for k, v in metrics.items()},
        is_best=is_best,
        created=_number(raw["created"], "created"),
        config=config,
        config_hash=config_hash_,
        metadata=metadata,
        versions={
            k: _str(v, f"versions[{_clip(k)!r}]")
            for k, v in _object(raw["versions"], "versions").items()
        },
        format=fmt,
        layouts=_layouts(raw.get("layouts", {}), entries),
    )
