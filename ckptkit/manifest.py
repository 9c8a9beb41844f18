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

from ckptkit.errors import ConfigError, CorruptCheckpointError
from ckptkit.storage.names import UnsafeNameError, check_member_name

FORMAT = "ckptkit/1"
MANIFEST = "manifest.json"
# The one file that holds several state entries (formats/native.py writes it).
STATE_FILE = "state.pt"

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
    size: int
    sha256: str


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
    # Sub-folder -> the layout of its files (``{"dcp/": "dcp"}``); written only when not
    # empty, so manifests without a sub-folder stay readable by older versions.
    layouts: dict[str, str] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """The manifest as written; ConfigError (nothing written) when a value could not
        be read back: a non-finite metric, a step past the name width, a NaN in config..."""
        try:
            raw = asdict(self)
            if not raw["layouts"]:
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
            manifest = _typed(_parse(data))
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
_OPTIONAL = ("layouts",)
# The layouts a sub-folder of a checkpoint may have (docs/FORMAT.md, "Sub-folders").
LAYOUTS = ("dcp",)


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


def _layouts(value: Any) -> dict[str, str]:
    """``{"folder/": layout}``: one plain folder name each, a layout this version reads."""
    out: dict[str, str] = {}
    for folder, layout in _object(value, "layouts").items():
        try:
            if not folder.endswith("/"):
                raise UnsafeNameError(f"{folder!r} does not end with '/'")
            check_member_name(folder[:-1])
        except UnsafeNameError as exc:
            raise _Invalid(f"unsafe folder name in layouts: {_clip(exc, 80)}") from None
        if layout not in LAYOUTS:
            raise _Invalid(f"layouts[{_clip(folder)!r}] is {_clip(layout)}, not one of {LAYOUTS}")
        out[folder] = layout
    return out


def folder_of(name: str) -> str | None:
    """``"dcp/"`` for a file name ``"dcp/__0_0.distcp"``; None for a top-level name."""
    return name.split("/", 1)[0] + "/" if "/" in name else None


def _files(value: Any, layouts: dict[str, str]) -> dict[str, FileEntry]:
    out: dict[str, FileEntry] = {}
    for name, entry in _object(value, "files").items():
        try:
            # One sub-folder level, and only a folder that ``layouts`` names.
            check_member_name(name, allow_subdirs=True)
            folder = folder_of(name)
            if folder is not None and (name.count("/") > 1 or folder not in layouts):
                raise UnsafeNameError(f"{name!r} lies in a sub-folder that layouts does not name")
        except UnsafeNameError as exc:
            raise _Invalid(f"unsafe file name: {_clip(exc, 80)}") from None
        if name == MANIFEST:
            raise _Invalid(f"files lists {MANIFEST} (the manifest does not list itself)")
        what = f"files[{_clip(name)!r}]"
        entry = _object(entry, what)
        if set(entry) != {"size", "sha256"}:
            raise _Invalid(
                f"{what} must have exactly 'size' and 'sha256', got {_clip(sorted(entry))}"
            )
        out[name] = FileEntry(
            size=_int(entry["size"], f"{what}.size", MAX_SIZE),
            sha256=_hex(entry["sha256"], f"{what}.sha256", 64),
        )
    return out


def _entries(value: Any, files: dict[str, FileEntry], layouts: dict[str, str]) -> dict[str, str]:
    entries = _object(value, "entries")
    holders: dict[str, str] = {}
    for key, fname in entries.items():
        what = f"entries[{_clip(key)!r}]"
        if _str(fname, what) in layouts:  # a folder: every state key it holds names it
            continue
        if fname not in files:
            raise _Invalid(f"{what} names {_clip(fname)!r}, a file the manifest does not list")
        # Only the shared state file holds several entries; any other file is one entry's.
        if fname != STATE_FILE and holders.setdefault(fname, key) != key:
            raise _Invalid(f"{_clip(fname)!r} is named by two entries")
    named = set(entries.values())
    for folder in sorted(set(layouts) - named):
        raise _Invalid(f"layouts names {_clip(folder)!r}, which no entry names")
    unnamed = sorted(f for f in set(files) - named if folder_of(f) not in named)
    if unnamed:  # the writer lists only files it decodes from: a stray one was added later
        raise _Invalid(f"files lists {_clip(unnamed[0])!r}, which no entry names")
    return entries


def _typed(raw: Any) -> Manifest:
    """A Manifest from parsed JSON, every field checked (see docs/FORMAT.md)."""
    raw = _object(raw, "the manifest")
    unknown = sorted(set(raw) - set(_FIELDS) - set(_OPTIONAL))
    if unknown:  # a newer format must change "format": an unknown field is not ignored
        raise _Invalid(f"unknown field {_clip(unknown[0])!r}")
    missing = [f for f in _FIELDS if f not in raw]
    if raw.get("format") != FORMAT:
        raise _Invalid(f"format {_clip(raw.get('format'))} is not {FORMAT!r}")
    if missing:
        raise _Invalid(f"no {missing[0]!r} field")
    layouts = _layouts(raw.get("layouts", {}))
    files = _files(raw["files"], layouts)
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
        entries=_entries(raw["entries"], files, layouts),
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
        format=FORMAT,
        layouts=layouts,
    )
