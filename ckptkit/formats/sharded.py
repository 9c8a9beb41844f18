"""Sharded state (``ShardedState``: FSDP2 / DTensor models and their optimizers) inside a
ckptkit checkpoint: the ``dcp/`` sub-folder, a ``torch.distributed.checkpoint`` directory.

Writing: every rank runs ``dcp.save`` into a private temporary directory (DCP plans the
shards collectively; rank 0 writes ``.metadata``), then sends its files to rank 0, which
commits them with the rest of the checkpoint: manifest last, sizes and sha256 of every
file, the run's own storage (any URL). The shards pass through rank 0's memory; see
docs/INTEGRATIONS.md for what that bounds.

Reading: the files listed under ``dcp/`` are read through the manifest (sizes, sha256)
and decoded by ``formats/dcp.py`` (restricted unpickler for ``.metadata``, weights-only
items, chunks assembled into full tensors): what ``ShardedState.load_state_dict`` hands
to DCP's ``set_state_dict``, which shards it again for this run's world size.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ckptkit.errors import CorruptCheckpointError
from ckptkit.manifest import Manifest

if TYPE_CHECKING:
    from ckptkit.distributed import Group
    from ckptkit.storage.confined import Member

FOLDER = "dcp/"
LAYOUT = "dcp"

# (files by name, state key -> "dcp/", {"dcp/": "dcp"}): what ``_write`` adds to a save.
Folder = tuple[dict[str, bytes], dict[str, str], dict[str, str]]


def encode(state: Mapping[str, Any], group: Group | None) -> Folder | None:
    """Save ``state`` (collected: DTensors allowed) through DCP on every rank of
    ``group`` (collective); the files on rank 0, None on the others."""
    import torch.distributed.checkpoint as dcp

    with tempfile.TemporaryDirectory(prefix="ckptkit-dcp-") as tmp:
        # No fsync here: these bytes are written (and synced) by the run's storage.
        writer = dcp.FileSystemWriter(tmp, sync_files=False)
        if group is None:
            with warnings.catch_warnings():  # "assuming ... a single process": it is
                warnings.filterwarnings("ignore", "torch.distributed is disabled")
                dcp.save(dict(state), storage_writer=writer, no_dist=True)
        else:
            dcp.save(dict(state), storage_writer=writer, process_group=group.pg)
        mine = {}
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                mine[FOLDER + name] = f.read()
    everyone = [mine] if group is None else group.gather(mine, "save")
    if everyone is None:
        return None
    files: dict[str, bytes] = {}
    for rank_files in everyone:
        files.update(rank_files)  # DCP names each rank's file by its rank: no clash
    return files, dict.fromkeys(state, FOLDER), {FOLDER: LAYOUT}


class _Files:
    """Read-only storage over the verified bytes of one sub-folder (for ``dcp.py``)."""

    def __init__(self, url: str, files: dict[str, bytes]) -> None:
        self.url, self._files = url, files

    def url_of(self, key: str) -> str:
        return f"{self.url}/{key}" if key else self.url

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._files[key]
        except KeyError:
            raise FileNotFoundError(self.url_of(key)) from None


def decode(
    manifest: Manifest,
    folder: str,
    keys: set[str],
    open_file: Callable[[str], Member],
    source: str,
) -> dict[str, Any]:
    """The state ``keys`` held by the ``folder`` of a checkpoint, as full tensors. The
    caller (``native.read_state``) has checked the folder's files against the manifest;
    each is read through the confined opener, never more than its recorded size."""
    from ckptkit.formats import dcp

    if manifest.layouts.get(folder) != LAYOUT:
        raise CorruptCheckpointError(f"{source}: {folder} has no layout this version reads")
    data: dict[str, bytes] = {}
    for name in sorted(n for n in manifest.files if n.startswith(folder)):
        with open_file(name) as member:
            data[name[len(folder) :]] = member.read()
    nested, _ = dcp.read_nested(_Files(f"{source}/{folder.rstrip('/')}", data))
    missing = sorted(keys - set(nested))
    if missing:
        raise CorruptCheckpointError(
            f"{source}/{folder}: holds no {missing[0]!r}, which the manifest says it holds "
            "(damaged)"
        )
    return {key: nested[key] for key in keys}
