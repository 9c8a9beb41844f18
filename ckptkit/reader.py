"""Read any checkpoint we understand, by URL: a native checkpoint directory, a native
run (its latest valid checkpoint), or a legacy file/directory. Always safe: nothing
is unpickled beyond tensors, primitives and a minimal numpy allowlist."""

from __future__ import annotations

from typing import Any

import torch

from ckptkit import run as runmod
from ckptkit.errors import CheckpointNotFoundError, CorruptCheckpointError
from ckptkit.formats import native
from ckptkit.formats.base import Loaded
from ckptkit.manifest import MANIFEST, Manifest
from ckptkit.storage.base import Storage
from ckptkit.storage.registry import open_storage


def _native_dir(storage: Storage, verify: bool) -> Loaded:
    manifest = Manifest.from_bytes(storage.read_bytes(MANIFEST), storage.url)

    def read(fname: str) -> bytes:
        try:
            return storage.read_bytes(fname)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{storage.url}: {fname} is missing") from None

    state = native.decode(manifest, read, storage.url, verify=verify)
    return runmod.as_loaded(state, storage.url, manifest)


def read_checkpoint(url: str, *, verify: bool = True, trust: bool = False) -> Loaded:
    """Read the checkpoint at ``url`` (see module docstring) into memory."""
    storage = open_storage(url)
    if storage.exists(MANIFEST):
        return _native_dir(storage, verify)
    for info in reversed(runmod.list_checkpoints(storage)):
        try:
            return runmod.read(storage, info, verify=verify)
        except CorruptCheckpointError as exc:
            runmod.warn(f"skipping {exc}")
    from ckptkit.formats.legacy import read_legacy

    loaded = read_legacy(storage, "", trust=trust)
    if loaded is None:
        what = "directory" if storage.isdir("") else "file" if storage.exists("") else "path"
        if what == "path":
            raise CheckpointNotFoundError(f"{url}: no such file or directory")
        raise CheckpointNotFoundError(
            f"{url}: this {what} is not a checkpoint ckptkit can read "
            "(no manifest.json, no committed step-* checkpoints, no legacy checkpoint file)"
        )
    return loaded


def load(url: str, *, verify: bool = True, trust: bool = False) -> dict[str, Any]:
    """The state of any checkpoint we read, as a plain nested dict of tensors and primitives.

    A legacy dict checkpoint comes back with every key the file held, under its own name,
    and nothing else; a bare state dict as ``{"model": state_dict}``."""
    loaded = read_checkpoint(url, verify=verify, trust=trust)
    return loaded.state if loaded.contents is None else loaded.contents


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {"tensor": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
    if isinstance(value, dict):
        tensors = [v for v in value.values() if isinstance(v, torch.Tensor)]
        if tensors and len(tensors) == len(value):
            return {
                "tensors": len(tensors),
                "parameters": int(sum(t.numel() for t in tensors)),
                "bytes": int(sum(t.numel() * t.element_size() for t in tensors)),
            }
        return {str(k): _describe(v) for k, v in list(value.items())[:20]}
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}[{len(value)}]"
    return value


# ``inspect --json``'s ``format`` names, by reader kind.
FORMATS = {
    "native": "ckptkit",
    "legacy-state-dict": "state_dict",
    "legacy-dict": "legacy_dict",
    "hf-trainer": "hf_trainer",
}


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _has(state: dict[str, Any], test: Any) -> bool:
    return any(isinstance(v, dict) and test(v) for v in state.values())


def resume_gaps(state: dict[str, Any]) -> list[str]:
    """What a full resume from ``state`` would lack, in the words restore uses."""
    checks = [
        (lambda v: "param_groups" in v, "no optimizer state: moments restart from zero"),
        (lambda v: "last_epoch" in v, "no scheduler state: the learning-rate schedule restarts"),
        (
            lambda v: {"python", "torch"} <= set(v),
            "no RNG state: data order and dropout will differ",
        ),
        (
            lambda v: "batches_yielded" in v,
            "no data-loader position: the epoch restarts from its first batch",
        ),
        (
            lambda v: "patience" in v and "best" in v,
            "no EarlyStopping state: the best score starts fresh",
        ),
    ]
    return [note for test, note in checks if not _has(state, test)]


def inspect(url: str, *, verify: bool = True, trust: bool = False) -> dict[str, Any]:
    """What a checkpoint holds: ``format`` (ckptkit, state_dict, legacy_dict, hf_trainer),
    ``step``, ``epoch``, ``metrics``, ``complete``, tensor count/bytes/dtypes, a summary of
    each state entry, versions and config (native), ``lacks``: what a full resume
    from it would not restore, ``config_globals``: the allowlisted config classes read as
    plain data, and ``unsafe_globals``: the globals outside the allowlist that
    ``trust=True`` unpickled (without it such a file raises UnsafeCheckpointError, whose
    ``globals`` lists them, found without running anything). A damaged checkpoint raises
    CorruptCheckpointError."""
    from ckptkit.formats.safe import recording

    with recording() as seen:
        loaded = read_checkpoint(url, verify=verify, trust=trust)
    tensors = _tensors(loaded.state)
    return {
        "source": loaded.source,
        "path": loaded.source,
        "format": FORMATS.get(loaded.kind, loaded.kind),
        "kind": loaded.kind,
        "complete": True,
        "step": loaded.step,
        "epoch": loaded.epoch,
        "metrics": loaded.metrics,
        "tensors": len(tensors),
        "bytes": int(sum(t.numel() * t.element_size() for t in tensors)),
        "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in tensors}),
        "state": {k: _describe(v) for k, v in loaded.state.items()},
        "lacks": resume_gaps(loaded.state),
        "notes": loaded.notes,
        "config_globals": seen.configs,
        "unsafe_globals": seen.unsafe,
        **{k: v for k, v in loaded.meta.items() if v is not None},
    }


def inspect_damaged(url: str, problem: str) -> dict[str, Any]:
    """``inspect``'s answer for a checkpoint that failed verification: what its manifest
    still says, with ``complete: false`` and the problem."""
    storage = open_storage(url)
    out: dict[str, Any] = {
        "source": url,
        "path": url,
        "format": None,
        "complete": False,
        "step": None,
        "problem": problem,
    }
    try:
        manifest = Manifest.from_bytes(storage.read_bytes(MANIFEST), url)
    except (FileNotFoundError, CorruptCheckpointError):
        return out
    return {
        **out,
        "format": "ckptkit",
        "step": manifest.step,
        "epoch": manifest.epoch,
        "metrics": manifest.metrics,
    }
