"""A ``torch.distributed.checkpoint`` directory's ``.metadata``, read without unpickling code.

torch's own ``FileSystemReader.read_metadata`` runs ``pickle.load`` on the file, so a
hostile ``.metadata`` runs code. Here the pickle goes through ``pickles``' restricted
unpickler: the DCP metadata dataclasses (``DCP_CLASSES``) are never imported, each is
built as a record of our own and returned as a plain dict; anything else is refused.
"""

from __future__ import annotations

from typing import Any

import torch

from ckptkit.errors import CorruptCheckpointError
from ckptkit.formats import pickles

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
