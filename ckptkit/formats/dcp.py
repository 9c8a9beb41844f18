"""A ``torch.distributed.checkpoint`` (DCP) directory, read without unpickling code.

Layout (torch's ``FileSystemWriter``): ``.metadata`` (a pickle of DCP's ``Metadata``) and
one ``__<rank>_<n>.distcp`` file per writer, each a concatenation of items. The metadata
says, for every flattened key (``"model.layer.weight"``, ``"optimizer.state.0.exp_avg"``),
either a tensor (its size, dtype and chunks: one per shard, by offset) or a pickled
object (``BytesStorageMetadata``: the optimizer's ``lr``, a plain ``step``...), and in
``storage_data`` which file and byte range holds each item. Every item is a
``torch.save``'d tensor or object (``FileSystemReader`` reads nothing else).

- torch's own ``FileSystemReader.read_metadata`` runs ``pickle.load`` on ``.metadata``, so a
  hostile one runs code. Here it goes through ``pickles``' restricted unpickler: the DCP
  metadata dataclasses (``DCP_CLASSES``) are never imported, each is built as a record of
  our own and returned as a plain dict; anything else is refused.
- Items are read through the confined opener, only inside their recorded byte range, and
  each is decoded with ``safe_torch_load`` (weights-only); file names must be plain
  names inside the directory.
- Chunks are assembled by their offsets into full tensors (every element covered exactly
  once, else the directory is corrupt), and the flat keys are nested again along the
  metadata's ``planner_data`` paths, as torch's ``dcp_to_torch_save`` does.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch

from ckptkit.errors import CorruptCheckpointError
from ckptkit.formats import pickles
from ckptkit.formats.base import Loaded
from ckptkit.storage import confined
from ckptkit.storage.base import Storage, join_key
from ckptkit.storage.names import UnsafeNameError, check_member_name

METADATA = ".metadata"
_MODULE = "torch.distributed.checkpoint.metadata"
DCP_CLASSES = (
    f"{_MODULE}.Metadata",
    f"{_MODULE}.TensorStorageMetadata",
    f"{_MODULE}.BytesStorageMetadata",
    f"{_MODULE}.ChunkStorageMetadata",
    f"{_MODULE}.TensorProperties",
    f"{_MODULE}.MetadataIndex",
    f"{_MODULE}.StorageMeta",
    "torch.distributed.checkpoint.filesystem._StorageInfo",
)
# TensorProperties pickles its fields as a tuple (its __getstate__), in this order.
_TUPLE_FIELDS = {
    "TensorProperties": ("dtype", "layout", "requires_grad", "memory_format", "pin_memory"),
}
# torch's _MEM_FORMAT_ENCODING enum values.
_MEMORY_FORMATS = ("contiguous_format", "channels_last", "channels_last_3d", "preserve_format")


class _Record(pickles._Stub):
    """One DCP metadata dataclass instance, by its class's short name."""

    kind = ""

    def __hash__(self) -> int:  # MetadataIndex is a dict key
        return id(self)


def _memory_format(code: Any) -> str:
    if isinstance(code, int) and 0 <= code < len(_MEMORY_FORMATS):
        return _MEMORY_FORMATS[code]
    raise CorruptCheckpointError(f"unknown DCP memory format code {code!r}")


def _allowed() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in DCP_CLASSES:
        short = name.rsplit(".", 1)[1].lstrip("_")
        out[name] = type(f"_{short}", (_Record,), {"kind": short})
    out[f"{_MODULE}._MEM_FORMAT_ENCODING"] = _memory_format
    paths = {k: v for k, v in pickles.CONFIG_GLOBALS.items() if k.startswith("pathlib")}
    return {**pickles.tensor_globals(), **paths, **out}


def read_metadata(data: bytes, *, source: str) -> dict[str, Any]:
    """The DCP ``.metadata`` pickle in ``data`` as plain data::

        {"type": "Metadata", "version": "1.0.0",
         "state_dict_metadata": {"model.w": {"type": "TensorStorageMetadata",
             "properties": {"dtype": "float32", ...}, "size": [2, 3],
             "chunks": [{"type": "ChunkStorageMetadata", "offsets": [0, 0], "sizes": [2, 3]}]},
             "step": {"type": "BytesStorageMetadata"}},
         "storage_data": [{"key": {"type": "MetadataIndex", "fqn": ...},
                           "value": {"type": "StorageInfo", "relative_path": ...}}],
         "planner_data": {...}, "storage_meta": {...}}

    Raises ``UnsafeCheckpointError`` naming every global outside the allowlist (nothing is
    run), ``CorruptCheckpointError`` when it is not a readable pickle of DCP metadata."""
    from ckptkit.formats.safe import unsafe_error

    allowed = _allowed()
    try:
        names = pickles.scan_globals(data, pickles=1)
    except ValueError as exc:
        raise CorruptCheckpointError(f"{source}: not a DCP metadata file ({exc})") from exc
    refused = pickles.unlisted(names, allowed)
    if refused:
        raise unsafe_error(source, refused)
    try:
        obj = pickles.restricted_loads(data, allowed)
    except pickles.Refused as exc:
        raise unsafe_error(source, [exc.what]) from exc
    except CorruptCheckpointError:
        raise
    except Exception as exc:
        raise CorruptCheckpointError(
            f"{source}: cannot be decoded as DCP metadata (truncated or damaged?): "
            f"{type(exc).__name__}: {str(exc)[:160]}"
        ) from exc
    plain = _plain(obj)
    if not isinstance(plain, dict) or plain.get("type") != "Metadata":
        raise CorruptCheckpointError(f"{source}: does not hold DCP Metadata")
    return plain


def _plain(obj: Any) -> Any:
    if isinstance(obj, _Record):
        state = obj.state
        fields = _TUPLE_FIELDS.get(obj.kind)
        if fields and isinstance(state, tuple) and len(state) == len(fields):
            state = dict(zip(fields, state, strict=True))
        elif isinstance(state, tuple) and len(state) == 2:  # (dict, slots) of slotted classes
            state = {**(state[0] or {}), **(state[1] or {})}
        items = state.items() if isinstance(state, dict) else ()
        return {"type": obj.kind, **{str(k): _plain(v) for k, v in items}}
    if isinstance(obj, torch.Size):
        return list(obj)
    if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
        return str(obj).removeprefix("torch.")
    if isinstance(obj, dict):
        if any(isinstance(k, _Record) for k in obj):
            return [{"key": _plain(k), "value": _plain(v)} for k, v in obj.items()]
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    return obj


# -- the data files ---------------------------------------------------------------------
KIND = "dcp"
# A sanity cap: a model with many thousand sharded tensors has a .metadata of some MB.
MAX_METADATA = 256 << 20
_ZIP_MAGIC = b"PK\x03\x04"


def check_not_interrupted(storage: Storage, key: str = "") -> None:
    """Raise ``CorruptCheckpointError`` for ``.distcp`` data files without ``.metadata``:
    DCP writes the metadata last, so that is a save that never finished."""
    if storage.isdir(key) and any(n.endswith(".distcp") for n in storage.listdir(key)):
        raise CorruptCheckpointError(
            f"{storage.url_of(key)}: DCP data files without .metadata (a "
            "torch.distributed.checkpoint save that never finished): save it again"
        )


def read_dcp(storage: Storage, key: str = "", *, trust: bool = False) -> Loaded:
    """The DCP directory at ``key`` as a nested state dict (see the module docstring).

    ``contents`` (what ``ckptkit.load`` returns) is what ``dcp_to_torch_save`` writes;
    ``state`` (what ``restore`` reads) is the same, with ckptkit's aliases (``step``...)
    and optimizer states keyed by parameter index again (DCP stores ``"0"``, which
    ``Optimizer.load_state_dict`` would silently ignore). Raises ``CorruptCheckpointError``
    when a file is missing, a range lies outside its file or an item does not decode."""
    from ckptkit.formats.legacy import dict_checkpoint

    source = storage.url_of(key)
    nested, count = read_nested(storage, key, trust=trust)
    loaded = dict_checkpoint(nested, source)
    loaded.kind = KIND
    loaded.state = {k: _int_keyed(v) for k, v in loaded.state.items()}
    loaded.notes.insert(0, f"a torch.distributed.checkpoint directory ({count} entries)")
    return loaded


def read_nested(
    storage: Storage, key: str = "", *, trust: bool = False
) -> tuple[dict[str, Any], int]:
    """The DCP directory at ``key`` as saved (keys nested along the metadata's paths,
    sharded tensors assembled), and its number of flat entries; the checks of
    :func:`read_dcp`, none of its aliases."""
    source = storage.url_of(key)
    meta_key = join_key(key, METADATA)
    data = confined.read_member(storage, meta_key, max_size=MAX_METADATA)
    meta = read_metadata(data, source=storage.url_of(meta_key))
    try:
        flat = _read_items(storage, key, meta, source, trust)
        return _unflatten(flat, meta.get("planner_data"), source), len(flat)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        # Well-formed records holding the wrong types (a hand-made or damaged .metadata).
        raise CorruptCheckpointError(
            f"{source}: malformed .metadata ({type(exc).__name__}: {str(exc)[:120]}): "
            "damaged or not written by torch.distributed.checkpoint"
        ) from None


def _read_items(
    storage: Storage, key: str, meta: dict[str, Any], source: str, trust: bool
) -> dict[str, Any]:
    """Every flat key of the metadata, decoded: tensors assembled from their chunks."""
    index = _storage_index(meta, source)
    entries = meta.get("state_dict_metadata")
    if not isinstance(entries, dict):
        raise CorruptCheckpointError(f"{source}: its .metadata lists no state")
    by_file: dict[str, list[tuple[str, tuple[int, ...] | None, dict[str, Any]]]] = {}
    for fqn, entry in entries.items():
        for offsets in _chunk_offsets(fqn, entry, source):
            info = index.get((fqn, offsets))
            if info is None:
                raise CorruptCheckpointError(
                    f"{source}: .metadata names no file for {fqn!r}"
                    f"{'' if offsets is None else f' at {list(offsets)}'} (damaged or incomplete)"
                )
            by_file.setdefault(info["relative_path"], []).append((fqn, offsets, info))
    pieces: dict[tuple[str, tuple[int, ...] | None], Any] = {}
    for name, items in sorted(by_file.items()):
        try:
            member = confined.open_member(storage, join_key(key, name))
        except FileNotFoundError:
            raise CorruptCheckpointError(
                f"{storage.url_of(join_key(key, name))}: missing (.metadata records data in "
                "it): the save was interrupted or the directory was copied partly"
            ) from None
        with member:
            end = 0
            for fqn, offsets, info in sorted(items, key=lambda item: item[2]["offset"]):
                # DCP writes items one after the other; a range shared or overlapped would
                # let a small file stand for much data, or one tensor for another.
                if info["offset"] < end:
                    raise CorruptCheckpointError(
                        f"{member.url}: .metadata records overlapping items ({fqn!r}): "
                        "damaged or not written by torch.distributed.checkpoint"
                    )
                end = info["offset"] + info["length"]
                raw = member.read_range(info["offset"], info["length"])
                where = f"{member.url} [{fqn}]"
                pieces[(fqn, offsets)] = _decode(raw, where, trust)
    return {fqn: _assemble(fqn, entry, pieces, source) for fqn, entry in entries.items()}


def _storage_index(
    meta: dict[str, Any], source: str
) -> dict[tuple[str, tuple[int, ...] | None], dict[str, Any]]:
    """``(fqn, chunk offsets or None) -> {"relative_path", "offset", "length"}``, checked."""
    rows = meta.get("storage_data")
    if rows == {}:
        rows = []
    if not isinstance(rows, list):
        raise CorruptCheckpointError(f"{source}: its .metadata has no storage index")
    out: dict[tuple[str, tuple[int, ...] | None], dict[str, Any]] = {}
    for row in rows:
        index, info = row.get("key"), row.get("value")
        if not isinstance(index, dict) or not isinstance(info, dict):
            raise CorruptCheckpointError(f"{source}: a malformed storage index entry")
        name = info.get("relative_path")
        try:
            check_member_name(name)
        except UnsafeNameError as exc:
            raise CorruptCheckpointError(
                f"{source}: .metadata points at {exc}: a DCP directory may only name "
                "files inside it"
            ) from None
        if not all(_is_count(info.get(k)) for k in ("offset", "length")):
            raise CorruptCheckpointError(f"{source}: a malformed byte range for {name!r}")
        if info.get("transform_descriptors"):
            raise CorruptCheckpointError(
                f"{source}: written with storage transforms {info['transform_descriptors']!r} "
                "(e.g. compression), which ckptkit does not decode: save without them"
            )
        offsets = index.get("offset")
        key = (index.get("fqn"), None if offsets is None else tuple(offsets))
        out[key] = {k: info[k] for k in ("relative_path", "offset", "length")}
    return out


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _chunk_offsets(fqn: str, entry: Any, source: str) -> list[tuple[int, ...] | None]:
    kind = entry.get("type") if isinstance(entry, dict) else None
    if kind == "BytesStorageMetadata":
        return [None]
    if kind != "TensorStorageMetadata" or not isinstance(entry.get("chunks"), list):
        raise CorruptCheckpointError(f"{source}: .metadata entry {fqn!r} is malformed")
    return [tuple(_ints(c.get("offsets"), fqn, source)) for c in entry["chunks"]]


def _ints(value: Any, fqn: str, source: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(_is_count(v) for v in value):
        raise CorruptCheckpointError(f"{source}: .metadata has a malformed shape for {fqn!r}")
    return list(value)


def _decode(raw: bytes, where: str, trust: bool) -> Any:
    from ckptkit.formats.safe import safe_torch_load

    if not raw.startswith(_ZIP_MAGIC):
        raise CorruptCheckpointError(f"{where}: not a torch.save'd item (damaged?)")
    return safe_torch_load(raw, source=where, trust=trust)


def _assemble(fqn: str, entry: dict[str, Any], pieces: dict[Any, Any], source: str) -> Any:
    if entry["type"] == "BytesStorageMetadata":
        return pieces[(fqn, None)]
    size = _ints(entry.get("size"), fqn, source)
    props = entry.get("properties") or {}
    dtype = getattr(torch, str(props.get("dtype")), None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptCheckpointError(f"{source}: .metadata has an unknown dtype for {fqn!r}")
    boxes = []
    for chunk in entry["chunks"]:
        offsets = tuple(_ints(chunk.get("offsets"), fqn, source))
        sizes = _ints(chunk.get("sizes"), fqn, source)
        piece = pieces[(fqn, offsets)]
        if (
            not isinstance(piece, torch.Tensor)
            or piece.dtype != dtype
            or list(piece.shape) != sizes
            or len(sizes) != len(size)
            or any(o + n > s for o, n, s in zip(offsets, sizes, size, strict=True))
        ):
            raise CorruptCheckpointError(
                f"{source}: a chunk of {fqn!r} does not match its recorded place (damaged?)"
            )
        boxes.append((offsets, sizes, piece))
    _check_cover(fqn, size, boxes, source)
    # Allocated only now: every chunk decoded from its file, so the size is backed by data.
    full = torch.empty(size, dtype=dtype)
    for offsets, sizes, piece in boxes:
        full[tuple(slice(o, o + n) for o, n in zip(offsets, sizes, strict=True))] = piece
    return full


def _check_cover(fqn: str, size: list[int], boxes: list[Any], source: str) -> None:
    """The chunks cover the tensor exactly once (no gap left uninitialised, no overlap)."""
    total = 1
    for s in size:
        total *= s
    covered = 0
    for _, sizes, _ in boxes:
        n = 1
        for s in sizes:
            n *= s
        covered += n
    overlap = any(_overlaps(a, b) for a, b in itertools.combinations(boxes, 2))
    if covered != total or overlap:
        raise CorruptCheckpointError(
            f"{source}: the chunks of {fqn!r} do not cover it exactly once (damaged or "
            "a partial save)"
        )


def _overlaps(a: Any, b: Any) -> bool:
    (start_a, size_a, _), (start_b, size_b, _) = a, b
    return (
        all(size_a)
        and all(size_b)
        and all(
            x < y + m and y < x + n
            for x, n, y, m in zip(start_a, size_a, start_b, size_b, strict=True)
        )
    )


def _unflatten(flat: dict[str, Any], mapping: Any, source: str) -> dict[str, Any]:
    """Nest the flat keys along ``planner_data`` paths (DCP's ``unflatten_state_dict``);
    a key without a path stays top-level, as a non-flattening save left it."""
    nested: dict[str, Any] = {}
    mapping = mapping if isinstance(mapping, dict) else {}
    for fqn, value in flat.items():
        path = mapping.get(fqn, (fqn,))
        if (
            not isinstance(path, (tuple, list))
            or not path
            or not isinstance(path[0], str)
            or not all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in path)
        ):
            raise CorruptCheckpointError(f"{source}: .metadata has a malformed path for {fqn!r}")
        _set(nested, list(path), value, fqn, source)
    return nested


def _set(root: dict[str, Any], path: list[Any], value: Any, fqn: str, source: str) -> None:
    node: Any = root
    for here, after in itertools.pairwise(path):
        fresh: Any = {} if isinstance(after, str) else []
        node = _child(node, here, fresh, fqn, source)
    _put(node, path[-1], value, fqn, source)


def _child(node: Any, key: Any, fresh: Any, fqn: str, source: str) -> Any:
    if isinstance(node, dict) and isinstance(key, str):
        return node.setdefault(key, fresh)
    if isinstance(node, list) and isinstance(key, int):
        _extend(node, key, fqn, source)
        if node[key] is None:
            node[key] = fresh
        return node[key]
    raise CorruptCheckpointError(f"{source}: .metadata paths for {fqn!r} conflict")


def _put(node: Any, key: Any, value: Any, fqn: str, source: str) -> None:
    if isinstance(node, list) and isinstance(key, int):
        _extend(node, key, fqn, source)
    elif not (isinstance(node, dict) and isinstance(key, str)):
        raise CorruptCheckpointError(f"{source}: .metadata paths for {fqn!r} conflict")
    node[key] = value


def _extend(node: list[Any], index: int, fqn: str, source: str) -> None:
    # A list index far past the data would allocate without bound: DCP lists are dense.
    if index > len(node) + 1_000_000:
        raise CorruptCheckpointError(f"{source}: .metadata has a malformed path for {fqn!r}")
    node.extend([None] * (index + 1 - len(node)))


def _int_keyed(value: Any) -> Any:
    """An optimizer state dict whose ``state`` keys DCP turned into strings, keyed by the
    integer parameter indices its ``param_groups`` use again; anything else as it is."""
    if not (
        isinstance(value, Mapping)
        and isinstance(value.get("state"), Mapping)
        and isinstance(value.get("param_groups"), list)
    ):
        return value
    params = {
        p for g in value["param_groups"] if isinstance(g, Mapping) for p in g.get("params", ())
    }
    state = value["state"]
    if not all(isinstance(k, str) and k.isdigit() and int(k) in params for k in state):
        return value
    return {**value, "state": {int(k): v for k, v in state.items()}}
