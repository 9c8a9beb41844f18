"""The native format: ``<key>.safetensors`` for flat tensor maps (model weights), one
``state.pt`` (weights_only-loadable torch.save) for everything else, and the manifest.

See docs/FORMAT.md. Encoding happens in memory so that sizes and hashes are known
before anything is written and the commit strategy can write the manifest last.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from typing import Any

import torch

from ckptkit.errors import CorruptCheckpointError
from ckptkit.formats.safe import safe_safetensors_load, safe_torch_load
from ckptkit.manifest import STATE_FILE, FileEntry, Manifest, sha256_bytes

_SAFE_FILENAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,100}$")


def _is_tensor_map(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def _shares_storage(tensors: Mapping[str, torch.Tensor]) -> bool:
    # safetensors refuses tensors that share memory (tied weights); those go to state.pt.
    seen: set[tuple[str, int]] = set()
    for t in tensors.values():
        key = (str(t.device), t.untyped_storage().data_ptr())
        if t.numel() and key in seen:
            return True
        seen.add(key)
    return False


def encode(state: Mapping[str, Any]) -> tuple[dict[str, bytes], dict[str, str]]:
    """Encode already-collected state (``{key: state_dict or value}``) into files.

    Returns ``(files, entries)``: file name -> bytes, and state key -> file name.
    """
    from safetensors.torch import save as st_save

    files: dict[str, bytes] = {}
    entries: dict[str, str] = {}
    rest: dict[str, Any] = {}
    for key, value in state.items():
        name = f"{key}.safetensors"
        if _is_tensor_map(value) and _SAFE_FILENAME.match(key) and not _shares_storage(value):
            tensors = {k: v.detach().cpu().contiguous() for k, v in value.items()}
            files[name] = st_save(tensors)
            entries[key] = name
        else:
            rest[key] = value
            entries[key] = STATE_FILE
    if rest:
        buf = io.BytesIO()
        torch.save(rest, buf)
        files[STATE_FILE] = buf.getvalue()
    return files, entries


def file_entries(files: Mapping[str, bytes]) -> dict[str, FileEntry]:
    return {
        name: FileEntry(size=len(data), sha256=sha256_bytes(data)) for name, data in files.items()
    }


def check_file(manifest: Manifest, name: str, data: bytes, source: str) -> None:
    """Raise CorruptCheckpointError when ``data`` is not what the manifest recorded."""
    entry = manifest.files.get(name)
    if entry is None:
        raise CorruptCheckpointError(f"{source}: {name} is not listed in the manifest")
    if len(data) != entry.size:
        raise CorruptCheckpointError(
            f"{source}/{name}: its size differs from the {entry.size} bytes the manifest "
            "records (truncated or damaged)"
        )
    if sha256_bytes(data) != entry.sha256:
        raise CorruptCheckpointError(
            f"{source}/{name}: sha256 does not match the manifest (damaged)"
        )


def decode(
    manifest: Manifest, read: Any, source: str, *, verify: bool = True, keys: set[str] | None = None
) -> dict[str, Any]:
    """Read the state back. ``read(name) -> bytes`` must be a confined read of a listed
    file (``run.read_file``: never more than the recorded size); ``keys`` limits what is
    decoded."""
    wanted = {k: f for k, f in manifest.entries.items() if keys is None or k in keys}
    out: dict[str, Any] = {}
    folders = {f for f in wanted.values() if f in manifest.layouts}
    for folder in sorted(folders):  # a sub-folder of another layout (dcp/: sharded state)
        from ckptkit.formats import sharded

        held = {k for k, f in wanted.items() if f == folder}
        out.update(sharded.decode(manifest, folder, held, read, source, verify=verify))
    for name in sorted(set(wanted.values()) - folders):
        data = read(name)
        if verify:
            check_file(manifest, name, data, source)
        if name == STATE_FILE:
            rest = safe_torch_load(data, source=f"{source}/{name}")
            if not isinstance(rest, dict):
                raise CorruptCheckpointError(f"{source}/{name}: expected a dict of state")
            out.update({k: v for k, v in rest.items() if k in wanted})
        else:
            key = next(k for k, f in wanted.items() if f == name)
            out[key] = safe_safetensors_load(data, source=f"{source}/{name}")
    return out
