"""The native format, written and read here only (docs/FORMAT.md).

``ckptkit/2`` (written): every tensor of the state, wherever it lies (model weights,
optimizer moments, RNG byte tensors, nested lists and dicts), goes to a
safetensors-compatible file, one per top-level state key (``model.safetensors``,
``optimizer.safetensors``...), streamed straight from the tensor's own memory; the rest
of the state is a small JSON tree (``state.json``) whose tensors are references
``{"tensor": [file, name]}``. A tensor met twice (tied weights) is written once and
referenced twice. The commit strategy hashes (xxh3-128) and writes the chunks as they
come, so a save needs no in-memory copy of the checkpoint.

``ckptkit/1`` (read): ``<key>.safetensors`` for flat tensor maps and one weights_only
``state.pt`` for the rest, sha256 per file.

Reading opens every file through the confined opener and reads each tensor straight
into a freshly allocated tensor (``pread`` into its memory, hashing the bytes as they
arrive), so a file truncated under the reader is a short read, i.e. a
CorruptCheckpointError. A restore may instead be lent a model's file mapped under a read
lease (``storage/mapping.py``: only where nothing can truncate it meanwhile), verified
whole before its tensors are handed out as views of the pages, which the model's
``load_state_dict`` then copies once.
"""

from __future__ import annotations

import base64
import json
import math
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import numpy as np
import torch

from ckptkit.errors import ConfigError, CorruptCheckpointError, IncompatibleCheckpointError
from ckptkit.formats.safe import safe_safetensors_load, safe_torch_load
from ckptkit.manifest import (
    FORMAT,
    FORMAT_1,
    STATE_FILE,
    TENSORS,
    TREE_FILE,
    UPGRADE,
    Manifest,
    file_hasher,
    is_folder,
    sha256_bytes,
)
from ckptkit.storage.confined import Member
from ckptkit.storage.mapping import PIECE, LeaseBroken, Lending, MappedFile

_SAFE_FILENAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,100}$")
# Bytes moved per read/write call, and the largest temporary copy a save makes of a
# tensor that is not contiguous CPU memory (GPU, transposed, sliced...).
CHUNK = 16 << 20
# A tensor file's JSON header: bounded before it is read (a hostile one could be huge).
MAX_HEADER = 100 << 20
# Bytes read per call on restore: hashed right after it is read, while still in the CPU
# cache (a thread hashing piece i while piece i+1 is read was measured slower on 2 shared
# cores: docs/FORMAT.md, "Restore speed").
READ_PIECE = 4 << 20
MAX_TREE = 64 << 20  # state.json: the state without its tensors (a few KB to MB)

# safetensors dtype names (https://github.com/huggingface/safetensors, "dtype").
_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}
for _name, _code in (
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code
_CODES = {code: dtype for dtype, code in _DTYPES.items()}
_ITEMSIZE = {dtype: dtype.itemsize for dtype in _CODES.values()}
_TORCH_DTYPES = {
    str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)
}

# Readers of entries stored as a folder, by the manifest's layout name: called as
# ``reader(manifest, folder, keys, open_file, source)`` once the folder's files passed
# their hash check, returning ``{key: value}`` for the state keys the folder holds. A
# layout not registered here was written by a newer ckptkit.
LayoutReader = Callable[[Manifest, str, set[str], Callable[[str], Member], str], dict[str, Any]]


def _read_dcp(
    manifest: Manifest, folder: str, keys: set[str], open_file: Callable[[str], Member], source: str
) -> dict[str, Any]:
    from ckptkit.formats import sharded  # torch.distributed.checkpoint only when met

    return sharded.decode(manifest, folder, keys, open_file, source)


LAYOUTS: dict[str, LayoutReader] = {"dcp": _read_dcp}

Payload = Callable[[], Iterator[memoryview]]


class Watch(Protocol):
    """Streams each tensor a file's payload holds (an async save's deferred copy,
    ``asyncsave._DeferredCopy``): ``planned`` once per file that will stream it, when
    the files are planned; ``stream`` yields its bytes (C order, as ``tensor_chunks``
    does) from wherever they are to be read now, and the consumer asks for the next
    chunk only once it is done with the one before. ``check`` runs after every data
    file is written and before the manifest: it raises to stop the commit."""

    def planned(self, t: torch.Tensor) -> None: ...

    def stream(self, t: torch.Tensor) -> Iterator[memoryview]: ...

    def check(self) -> None: ...


# -- writing ---------------------------------------------------------------------------
class _Tensors:
    """One tensor file being planned: names, tensors, header."""

    def __init__(self, fname: str) -> None:
        self.fname = fname
        self.tensors: dict[str, torch.Tensor] = {}
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> str:
        base, n = name or "tensor", 1
        while name in self.tensors or not name or name == "__metadata__":
            n += 1
            name = f"{base}#{n}"
        self.tensors[name] = tensor
        return name

    def header(self) -> bytes:
        """The safetensors header; sets ``nbytes``, the size of the data after it."""
        header: dict[str, Any] = {"__metadata__": {"format": FORMAT}}
        offset = 0
        for name, t in self.tensors.items():
            end = offset + t.numel() * t.element_size()
            header[name] = {
                "dtype": _DTYPES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, end],
            }
            offset = end
        self.nbytes = offset
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # data starts 8-aligned, as safetensors writes it
        return struct.pack("<Q", len(text)) + text

    def payload(self, watch: Watch | None = None) -> Payload:
        header = self.header()
        if watch is not None:
            for t in self.tensors.values():
                watch.planned(t)

        def chunks() -> Iterator[memoryview]:
            yield memoryview(header)
            for t in self.tensors.values():
                yield from tensor_chunks(t) if watch is None else watch.stream(t)

        chunks.size = len(header) + self.nbytes  # type: ignore[attr-defined]
        return chunks


def bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (the view keeps it alive)."""
    if t.dim() == 0:
        t = t.reshape(1)
    if t.requires_grad:
        t = t.detach()
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def tensor_chunks(t: torch.Tensor) -> Iterator[memoryview]:
    """``t``'s bytes in C order, from its own memory when it is contiguous on the CPU;
    otherwise converted in pieces of at most CHUNK bytes (rows, recursively)."""
    if t.numel() == 0:
        return
    if t.device.type == "cpu" and t.is_contiguous():
        yield bytes_of(t)
    elif t.numel() * t.element_size() <= CHUNK or t.dim() == 0:
        yield bytes_of(t.contiguous().cpu())
    elif t.is_contiguous():
        flat, step = t.view(-1), max(1, CHUNK // t.element_size())
        for i in range(0, flat.numel(), step):
            yield bytes_of(flat[i : i + step].cpu())
    elif t.shape[0] == 1:
        yield from tensor_chunks(t[0])
    else:
        rows = max(1, CHUNK // (t[0].numel() * t.element_size()))
        for i in range(0, t.shape[0], rows):
            yield from tensor_chunks(t[i : i + rows])


class _Encoder:
    def __init__(self) -> None:
        self.files: dict[str, _Tensors] = {}
        self.seen: dict[tuple[Any, ...], list[str]] = {}
        self.current = _Tensors("")  # the file of the entry being encoded

    def entry(self, key: str, value: Any) -> Any:
        fname = f"{key}{TENSORS}" if _SAFE_FILENAME.match(key) else ""
        n = 0
        while not fname or fname in self.files:
            n += 1
            fname = f"entry-{n}{TENSORS}"
        self.current = _Tensors(fname)
        tree = self.value(value, "", f"state[{key!r}]")
        if self.current.tensors:
            self.files[fname] = self.current
        return tree

    def value(self, v: Any, path: str, where: str) -> Any:
        # The two kinds a state is made of, first: its hundreds of tensors and dicts (a
        # save waits for this walk, so the common cases take no detour).
        kind = type(v)
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            return self.tensor(v, path, where)
        if kind is dict:
            return {"dict": [self._item(k, x, path, where) for k, x in v.items()]}
        if kind is int or kind is str or v is None or kind is bool:
            return v
        if isinstance(v, torch.Tensor):
            return self.tensor(v, path, where)
        if isinstance(v, bool | str):
            return v
        if isinstance(v, int):
            return int(v)
        if isinstance(v, float):
            return float(v) if math.isfinite(v) else {"float": repr(float(v))}
        if isinstance(v, np.generic):
            return self.value(v.item(), path, where)
        if isinstance(v, np.ndarray):
            return self.tensor(torch.from_numpy(np.ascontiguousarray(v)), path, where)
        if isinstance(v, torch.dtype):
            return {"dtype": str(v).removeprefix("torch.")}
        if isinstance(v, torch.Size):
            return {"size": list(v)}
        if isinstance(v, bytes | bytearray):
            return {"bytes": base64.b64encode(bytes(v)).decode()}
        if isinstance(v, Mapping):
            return {"dict": [self._item(k, x, path, where) for k, x in v.items()]}
        if isinstance(v, list | tuple):
            if all(type(x) is int for x in v):  # a param group's "params": ids
                items: list[Any] = list(v)
            else:
                items = [self.value(x, _join(path, i), where) for i, x in enumerate(v)]
            return items if isinstance(v, list) else {"tuple": items}
        raise ConfigError(
            f"{where} holds a {type(v).__name__}: give it state_dict()/load_state_dict(), "
            "or store plain values (numbers, strings, tensors, lists/dicts)"
        )

    def _item(self, k: Any, x: Any, path: str, where: str) -> list[Any]:
        key = k if type(k) is str or type(k) is int else self.value(k, "", f"a key of {where}")
        return [key, self.value(x, f"{path}.{k}" if path else str(k), where)]

    def tensor(self, t: torch.Tensor, path: str, where: str) -> Any:
        if t.layout != torch.strided or t.is_quantized or t.is_meta:
            raise ConfigError(
                f"{where} holds a {t.layout} {t.device.type} tensor: save dense tensors "
                "(.to_dense(), .dequantize())"
            )
        if t.dtype not in _DTYPES:
            raise ConfigError(f"{where} holds a tensor of dtype {t.dtype}, which is not saved")
        if t.requires_grad:
            t = t.detach()
        if t.is_conj() or t.is_neg():
            t = t.resolve_conj().resolve_neg()
        # The same view of the same memory (tied weights) is written once.
        numel = t.numel()
        ident = (t.device, t.data_ptr(), t.dtype, t.shape, t.stride())
        if numel and ident in self.seen:
            return {"tensor": self.seen[ident]}
        ref = [self.current.fname, self.current.add(path, t)]
        if numel:
            self.seen[ident] = ref
        return {"tensor": ref}


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def encode(
    state: Mapping[str, Any], watch: Watch | None = None
) -> tuple[dict[str, Payload], dict[str, str]]:
    """Plan the files of already-collected state (``{key: state_dict or value}``).

    Returns ``(files, entries)``: file name -> a function yielding its bytes (chunks that
    are views of the tensors' memory), and state key -> ``state.json``. Everything that
    can be refused (a type that is not saved) is refused here, before any byte is written.
    ``watch``: told as each tensor is streamed (see ``Watch``).
    """
    enc = _Encoder()
    tree = {"format": FORMAT, "entries": {k: enc.entry(k, v) for k, v in state.items()}}
    files: dict[str, Payload] = {f: t.payload(watch) for f, t in enc.files.items()}
    if state:  # an empty state is a checkpoint of no files
        text = json.dumps(tree, separators=(",", ":"), allow_nan=False).encode()
        files[TREE_FILE] = lambda: iter([memoryview(text)])
    return files, dict.fromkeys(state, TREE_FILE)


# -- reading -----------------------------------------------------------------------------
Opener = Callable[[str], Member]


def read_state(
    manifest: Manifest,
    open_file: Opener,
    source: str,
    *,
    verify: bool = True,
    keys: set[str] | None = None,
    lending: Lending | None = None,
) -> dict[str, Any]:
    """The state of a native checkpoint, every file opened with ``open_file`` (a confined
    open of a listed file of the recorded size: ``run.open_file``). ``verify``: check each
    file's hash against the manifest as it is read; ``keys`` limits what is decoded.

    ``lending``: the tensors of the state keys it names (models, which copy what they
    are given) may be views of the mapped files instead of fresh tensors, valid until
    ``lending.close()``; every byte is verified before the first view is made."""
    if manifest.format == FORMAT_1:
        return _read_v1(manifest, open_file, source, verify=verify, keys=keys)
    wanted = {k: f for k, f in manifest.entries.items() if keys is None or k in keys}
    out: dict[str, Any] = {}
    folders = sorted({f for f in wanted.values() if is_folder(f)})
    for folder in folders:
        layout = manifest.layouts[folder]
        if verify:
            check_files(
                manifest, open_file, source, [f for f in manifest.files if f.startswith(folder)]
            )
        reader = LAYOUTS.get(layout)
        if reader is None:
            raise IncompatibleCheckpointError(
                f"{source}: layout {layout!r} of {folder} was {UPGRADE}"
            )
        out.update(
            reader(
                manifest, folder, {k for k, f in wanted.items() if f == folder}, open_file, source
            )
        )
    tree_keys = {k for k, f in wanted.items() if f == TREE_FILE}
    if tree_keys:
        out.update(
            _read_tree(
                manifest, open_file, source, verify, tree_keys, full=keys is None, lending=lending
            )
        )
    return out


def _read_tree(
    manifest: Manifest,
    open_file: Opener,
    source: str,
    verify: bool,
    keys: set[str],
    full: bool,
    lending: Lending | None,
) -> dict[str, Any]:
    where = f"{source}/{TREE_FILE}"
    with open_file(TREE_FILE) as member:
        if member.size > MAX_TREE:
            raise CorruptCheckpointError(f"{where}: larger than the {MAX_TREE >> 20} MiB allowed")
        data = member.read()
    if verify:
        _check_hash(manifest, TREE_FILE, [data], source)
    tree = _strict_json(data, where)
    if (
        not isinstance(tree, dict)
        or tree.get("format") != FORMAT
        or set(tree) != {"format", "entries"}
    ):
        raise CorruptCheckpointError(f"{where}: not a ckptkit/2 state tree (damaged)")
    entries = tree["entries"]
    if not isinstance(entries, dict) or set(entries) != {
        k for k, f in manifest.entries.items() if f == TREE_FILE
    }:
        raise CorruptCheckpointError(f"{where}: its entries differ from the manifest's (damaged)")
    per_key: dict[str, dict[str, set[str]]] = {k: {} for k in keys}
    for k, mine in per_key.items():
        _collect_refs([entries[k]], mine, where)
    refs: dict[str, set[str]] = {}
    for mine in per_key.values():
        for fname, names in mine.items():
            refs.setdefault(fname, set()).update(names)
    # Files that only lent keys refer to (a tied tensor may cross keys: then copied).
    lent: set[str] = set()
    if lending is not None:
        lent = {f for k, mine in per_key.items() if k in lending.keys for f in mine}
        lent -= {f for k, mine in per_key.items() if k not in lending.keys for f in mine}
    listed = {f for f in manifest.files if f.endswith(TENSORS) and "/" not in f}
    for fname in refs:
        if fname not in listed:
            raise CorruptCheckpointError(
                f"{where}: refers to {fname[:60]!r}, which the manifest does not list"
            )
    if full and listed - set(refs):
        stray = sorted(listed - set(refs))[0]
        raise CorruptCheckpointError(f"{source}: {stray} is listed but no state refers to it")
    tensors = {
        f: read_tensors(manifest, open_file, f, source, verify, lending if f in lent else None)
        for f in sorted(refs)
    }
    for fname, names in refs.items():
        missing = sorted(names - set(tensors[fname]))
        if missing:
            raise CorruptCheckpointError(
                f"{where}: refers to tensor {missing[0][:60]!r}, which {fname} does not hold"
            )
    try:
        return {k: _decode(entries[k], tensors, where) for k in keys}
    except RecursionError:
        raise CorruptCheckpointError(f"{where}: nested too deeply (damaged)") from None


def _strict_json(data: bytes, where: str) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(items)
        if len(out) != len(items):
            raise ValueError("duplicate key")
        return out

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not allowed")

    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError...
        raise CorruptCheckpointError(
            f"{where}: not valid JSON ({str(exc)[:80]}); damaged"
        ) from None


def _collect_refs(values: list[Any], refs: dict[str, set[str]], where: str) -> None:
    todo = list(values)
    while todo:
        v = todo.pop()
        if isinstance(v, list):
            todo.extend(v)
        elif isinstance(v, dict):
            if len(v) != 1:
                raise CorruptCheckpointError(
                    f"{where}: a value with keys {sorted(v)[:3]} (damaged)"
                )
            ((tag, body),) = v.items()
            if tag == "tensor":
                if not (
                    isinstance(body, list)
                    and len(body) == 2
                    and all(isinstance(x, str) for x in body)
                ):
                    raise CorruptCheckpointError(f"{where}: a malformed tensor reference")
                refs.setdefault(body[0], set()).add(body[1])
            elif tag in ("dict", "tuple") and isinstance(body, list):
                todo.extend(body)


def _decode(v: Any, tensors: dict[str, dict[str, torch.Tensor]], where: str) -> Any:
    """A value of the state tree back as Python objects (tensors: the ones read; the
    same reference gives the same tensor object, so tied weights stay tied)."""
    if v is None or isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        return v
    if isinstance(v, list):
        return [_decode(x, tensors, where) for x in v]
    if not isinstance(v, dict) or len(v) != 1:
        raise CorruptCheckpointError(f"{where}: an unreadable value (damaged)")
    ((tag, body),) = v.items()
    try:
        if tag == "tensor":
            return tensors[body[0]][body[1]]
        if tag == "dict" and isinstance(body, list):
            out = {}
            for pair in body:
                if not isinstance(pair, list) or len(pair) != 2:
                    raise ValueError
                key = _decode(pair[0], tensors, where)
                out[key] = _decode(pair[1], tensors, where)
            return out
        if tag == "tuple" and isinstance(body, list):
            return tuple(_decode(x, tensors, where) for x in body)
        if tag == "float" and body in ("nan", "inf", "-inf"):
            return float(body)
        if tag == "bytes" and isinstance(body, str):
            return base64.b64decode(body, validate=True)
        if tag == "dtype" and body in _TORCH_DTYPES:
            return _TORCH_DTYPES[body]
        if tag == "size" and isinstance(body, list) and all(_is_int(x) for x in body):
            return torch.Size(body)
    except (ValueError, TypeError, KeyError, IndexError):
        pass
    raise CorruptCheckpointError(
        f"{where}: an unreadable value of kind {str(tag)[:40]!r} (damaged, or not ckptkit's)"
    )


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_tensors(
    manifest: Manifest,
    open_file: Opener,
    fname: str,
    source: str,
    verify: bool,
    lending: Lending | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor of a ckptkit/2 tensor file: views of the file mapped by ``lending``
    (verified whole first) where it may map it, else each read straight into a fresh
    tensor; the header is checked first (offsets, dtypes, shapes), the hash as bytes
    arrive."""
    where = f"{source}/{fname}"
    with open_file(fname) as member:
        mapped = lending.map(member.fd, member.size, where) if lending is not None else None
        if mapped is not None:
            try:
                return _mapped_tensors(manifest, fname, mapped, source, verify)
            except LeaseBroken:  # a writer is waiting: read this file the other way
                assert lending is not None
                lending.drop(mapped)
        hasher = file_hasher() if verify else None
        out = _read_file(member, where, hasher)
    if hasher is not None:
        _compare(manifest, fname, hasher.hexdigest(), source)
    return out


def read_safetensors(member: Member, where: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, ours or a foreign one (a Hugging Face shard),
    in the order its header lists them: the header checked as for a ckptkit/2 tensor
    file, then each tensor read straight into a fresh tensor. Nothing is mapped: a
    mapped file rewritten in place later would kill the process with SIGBUS wherever
    the tensors it lent are used (``formats/safe.py``, ``_open``)."""
    return _read_file(member, where, None)


def _read_file(member: Member, where: str, hasher: Any) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors ``member``, ``hasher`` fed every byte (or None)."""
    head = member.read_range(0, 8) if member.size >= 8 else b""
    n = _header_size(head, member.size, where)
    text = member.read_range(8, n)
    header = _strict_json(text, where)
    plan = _plan(header, member.size - 8 - n, where)
    if hasher is not None:
        hasher.update(head)
        hasher.update(text)
    out = _read_plan(member, 8 + n, plan, where, hasher)
    return {name: out[name] for name in header if name in out}


def _header_size(head: bytes, size: int, where: str) -> int:
    if len(head) != 8:
        raise CorruptCheckpointError(f"{where}: too short for a tensor file (truncated)")
    (n,) = struct.unpack("<Q", head)
    if n > min(MAX_HEADER, size - 8):
        raise CorruptCheckpointError(
            f"{where}: its header is said to be larger than the file (damaged)"
        )
    return n


def _mapped_tensors(
    manifest: Manifest, fname: str, mapped: MappedFile, source: str, verify: bool
) -> dict[str, torch.Tensor]:
    """The tensors of a mapped file as views of its pages, after one pass that hashes
    every byte (the lease looked at between pieces): nothing is handed out unverified."""
    where = f"{source}/{fname}"
    view = mapped.view
    assert view is not None
    n = _header_size(bytes(view[:8]), mapped.size, where)
    plan = _plan(_strict_json(bytes(view[8 : 8 + n]), where), mapped.size - 8 - n, where)
    if verify:
        hasher = file_hasher()
        for a in range(0, mapped.size, PIECE):
            hasher.update(view[a : a + PIECE])
            if not mapped.intact():
                raise LeaseBroken
        _compare(manifest, fname, hasher.hexdigest(), source)
    elif not mapped.intact():
        raise LeaseBroken
    out: dict[str, torch.Tensor] = {}
    for name, dtype, shape, begin, end in plan:
        try:
            out[name] = mapped.tensor(8 + n + begin, end - begin, dtype, shape)
        except (RuntimeError, ValueError, TypeError, OverflowError):  # sizes overflow
            raise CorruptCheckpointError(
                f"{where}: tensor {name[:60]!r} has an impossible shape"
            ) from None
    return out


def _read_plan(
    member: Member,
    base: int,
    plan: list[tuple[str, torch.dtype, list[int], int, int]],
    where: str,
    hasher: Any,
) -> dict[str, torch.Tensor]:
    """Each tensor of ``plan`` read into a fresh tensor, in READ_PIECE pieces, each
    hashed right after it is read, while it is still in the CPU cache."""
    out: dict[str, torch.Tensor] = {}
    for name, dtype, shape, begin, end in plan:
        try:
            t = torch.empty(shape, dtype=dtype)
        except (RuntimeError, ValueError, TypeError, OverflowError):  # sizes overflow
            raise CorruptCheckpointError(
                f"{where}: tensor {name[:60]!r} has an impossible shape"
            ) from None
        if end > begin:
            view = bytes_of(t)
            for a in range(0, end - begin, READ_PIECE):
                piece = view[a : a + READ_PIECE]
                member.readinto(base + begin + a, piece)
                if hasher is not None:
                    hasher.update(piece)
        out[name] = t
    return out


def _plan(
    header: Any, data_size: int, where: str
) -> list[tuple[str, torch.dtype, list[int], int, int]]:
    """The checked tensors of a header, in file order: every byte of the data section
    belongs to exactly one tensor (no gap, no overlap), each of its dtype and shape."""

    def bad(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{where}: {why} (damaged)")

    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    plan = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(x, str) for x in info.values()):
                raise bad("its __metadata__ is not a map of strings")
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name[:60]!r} has a malformed header entry")
        dtype = _CODES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        shape, offsets = info["shape"], info["data_offsets"]
        if dtype is None:
            raise bad(f"tensor {name[:60]!r} has an unknown dtype")
        if not (
            isinstance(shape, list)
            and len(shape) <= 64
            and all(_is_int(x) and x < 1 << 62 for x in shape)
        ):
            raise bad(f"tensor {name[:60]!r} has a malformed shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
            raise bad(f"tensor {name[:60]!r} has malformed data offsets")
        begin, end = offsets
        nbytes = math.prod(shape) * _ITEMSIZE[dtype]
        if end - begin != nbytes:
            raise bad(f"tensor {name[:60]!r}: its offsets do not fit its dtype and shape")
        plan.append((name, dtype, shape, begin, end))
    plan.sort(key=lambda p: (p[3], p[4]))
    at = 0
    for name, _, _, begin, end in plan:
        if begin != at:
            raise bad(f"tensor {name[:60]!r} overlaps another or leaves a gap")
        at = end
    if at != data_size:
        raise bad("its tensors do not cover the file exactly (truncated or padded)")
    return plan


def check_files(
    manifest: Manifest, open_file: Opener, source: str, names: list[str] | None = None
) -> None:
    """Size and hash of every listed file (or of ``names``), streamed: the full check."""
    for fname in manifest.files if names is None else names:
        with open_file(fname) as member:
            _check_hash(manifest, fname, _pieces(member), source)


def _pieces(member: Member) -> Iterator[bytes]:
    for offset in range(0, member.size, CHUNK):
        yield member.read_range(offset, min(CHUNK, member.size - offset))


def _check_hash(manifest: Manifest, fname: str, pieces: Any, source: str) -> None:
    entry = manifest.files[fname]
    if entry.sha256 is not None:  # ckptkit/1
        data = b"".join(pieces)
        if sha256_bytes(data) != entry.sha256:
            raise CorruptCheckpointError(
                f"{source}/{fname}: sha256 does not match the manifest (damaged)"
            )
        return
    hasher = file_hasher()
    for piece in pieces:
        hasher.update(piece)
    _compare(manifest, fname, hasher.hexdigest(), source)


def _compare(manifest: Manifest, fname: str, digest: str, source: str) -> None:
    if digest != manifest.files[fname].xxh3:
        raise CorruptCheckpointError(
            f"{source}/{fname}: xxh3 does not match the manifest (damaged)"
        )


# -- ckptkit/1 ---------------------------------------------------------------------------
def _read_v1(
    manifest: Manifest, open_file: Opener, source: str, *, verify: bool, keys: set[str] | None
) -> dict[str, Any]:
    wanted = {k: f for k, f in manifest.entries.items() if keys is None or k in keys}
    out: dict[str, Any] = {}
    for name in sorted(set(wanted.values())):
        with open_file(name) as member:
            data = member.read()
        if verify:
            _check_hash(manifest, name, [data], source)
        if name == STATE_FILE:
            rest = safe_torch_load(data, source=f"{source}/{name}")
            if not isinstance(rest, dict):
                raise CorruptCheckpointError(f"{source}/{name}: expected a dict of state")
            out.update({k: v for k, v in rest.items() if k in wanted})
        else:
            key = next(k for k, f in wanted.items() if f == name)
            out[key] = safe_safetensors_load(data, source=f"{source}/{name}")
    return out
