"""Read any checkpoint we understand, by URL: a native checkpoint directory, a native
run (its latest valid checkpoint), or a legacy file/directory. Always safe: nothing
is unpickled beyond tensors, primitives and a minimal numpy allowlist."""

from __future__ import annotations

from typing import Any

import torch

from ckptkit import run as runmod
from ckptkit.errors import CheckpointNotFoundError, CorruptCheckpointError
from ckptkit.formats.base import Loaded
from ckptkit.manifest import MANIFEST, parse_name
from ckptkit.storage.base import Storage, join_key
from ckptkit.storage.registry import open_storage, scheme_of


def _as_run_member(url: str) -> tuple[Storage, str] | None:
    """``(storage of the run, name)`` when ``url`` names a ``step-*`` checkpoint of a run:
    it is then read as a member of that run, so that the checkpoint directory itself is
    opened without following a link (only the run root may be one)."""
    base, _, query = url.partition("?")
    head, _, name = base.rstrip("/").rpartition("/")
    if parse_name(name) is None:
        return None
    if not head and not scheme_of(url):
        head = "."
    if not head or head.endswith(":") or head.endswith(":/"):
        return None
    parent = open_storage(head + (f"?{query}" if query else ""))
    if not parent.exists(join_key(name, MANIFEST)):
        return None
    return parent, name


def _native_dir(storage: Storage, name: str, verify: bool) -> Loaded:
    info = runmod.CheckpointInfo(name, storage.url_of(name), runmod.read_manifest(storage, name))
    return runmod.read(storage, info, verify=verify)


def read_checkpoint(url: str, *, verify: bool = True, trust: bool = False) -> Loaded:
    """Read the checkpoint at ``url`` (see module docstring) into memory."""
    member = _as_run_member(url)
    if member is not None:
        return _native_dir(*member, verify)
    storage = open_storage(url)
    if storage.exists(MANIFEST):
        return _native_dir(storage, "", verify)
    for info in runmod.newest_first(storage):  # reads manifests only down to a valid one
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
    "accelerate": "accelerate",
    "dcp": "dcp",
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
    # One level down too (a ShardedState entry holds {"model": ..., "optimizer": ...}), and
    # a list of states counts (Lightning's optimizer_states / lr_schedulers).
    def found(v: Any) -> bool:
        return isinstance(v, dict) and test(v)

    values = [x for v in state.values() for x in (v if isinstance(v, (list, tuple)) else [v])]
    return any(found(v) or (isinstance(v, dict) and any(map(found, v.values()))) for v in values)


def _is_rng(v: dict[str, Any]) -> bool:
    """RNGState's layout, or one per process (``{"ranks": [...]}``, accelerate's adapter)."""
    ranks = v.get("ranks")
    if isinstance(ranks, list) and ranks and isinstance(ranks[0], dict):
        v = ranks[0]
    return {"python", "torch"} <= set(v)


def resume_gaps(state: dict[str, Any]) -> list[str]:
    """What a full resume from ``state`` would lack, in the words restore uses."""
    checks = [
        (lambda v: "param_groups" in v, "no optimizer state: moments restart from zero"),
        (lambda v: "last_epoch" in v, "no scheduler state: the learning-rate schedule restarts"),
        (_is_rng, "no RNG state: data order and dropout will differ"),
        (
            # ResumableDataLoader's, or a tracked accelerate loader's (integrations/accelerate.py)
            lambda v: "batches_yielded" in v or {"iteration", "batches", "length"} <= set(v),
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
    storage, name = _as_run_member(url) or (open_storage(url), "")
    out: dict[str, Any] = {
        "source": url,
        "path": url,
        "format": None,
        "complete": False,
        "step": None,
        "problem": problem,
    }
    try:
        manifest = runmod.read_manifest(storage, name)
    except CorruptCheckpointError:
        return out
    return {
        **out,
        "format": "ckptkit",
        "step": manifest.step,
        "epoch": manifest.epoch,
        "metrics": manifest.metrics,
    }


def verify(url: str, *, trust: bool = False) -> list[dict[str, Any]]:
    """The full check of a checkpoint, or of every checkpoint directory of a run (an
    interrupted save's included): ``[{"url", "ok", "problem"}]``. A legacy file is
    test-loaded safely instead (its errors raise, as ``read_checkpoint``'s do)."""
    storage = open_storage(url)
    if storage.exists(MANIFEST):
        targets = [("", url)]
    else:
        targets = [(n, storage.url_of(n)) for n in storage.listdir("") if parse_name(n)]
    if not targets and parse_name(url.rstrip("/").rsplit("/", 1)[-1]) and storage.isdir(""):
        # A checkpoint directory of a run without its manifest: an interrupted save.
        problem = f"{url}: no manifest (an interrupted save); it is ignored"
        return [{"url": url, "ok": False, "problem": problem}]
    if not targets:
        from ckptkit.formats import accelerate, hf

        # every checkpoint(-|_)N of an HF output dir or accelerate project, or the one
        foreign = accelerate.verify_dir(storage, trust=trust)
        foreign = hf.verify_dir(storage, trust=trust) if foreign is None else foreign
        if foreign is not None:
            return foreign
        read_checkpoint(url, trust=trust)  # legacy: a safe full load is the check
        return [{"url": url, "ok": True, "problem": None}]
    results: list[dict[str, Any]] = []
    for name, target in targets:
        try:
            if name:  # a checkpoint of the run: its manifest must be there (no legacy guess)
                info = runmod.CheckpointInfo(name, target, runmod.read_manifest(storage, name))
                runmod.read_state(storage, info, verify=True)
            else:
                read_checkpoint(url, verify=True)
            results.append({"url": target, "ok": True, "problem": None})
        except CorruptCheckpointError as exc:
            results.append({"url": target, "ok": False, "problem": str(exc)})
    return results


def foreign_status(url: str, *, verify: bool = True) -> list[dict[str, Any]]:
    """``ckptkit ls``'s rows for a path that holds no native run but a checkpoint we read
    another way (a DCP directory, a legacy or HF file/directory): one row, read in full
    (``checked: "decoded"``), ``status`` ``complete`` or ``corrupt`` with the problem;
    ``[]`` when nothing readable is there."""
    name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    row: dict[str, Any] = {
        **runmod.status_row(name, url, None, "decoded"),
        "latest": False,
        "best": False,
        "is_best": False,
        "format": None,
    }
    try:
        loaded = read_checkpoint(url, verify=verify)
    except CheckpointNotFoundError:
        return []
    except CorruptCheckpointError as exc:
        return [{**row, "status": "corrupt", "problem": str(exc)}]
    tensors = _tensors(loaded.state if loaded.contents is None else loaded.contents)
    return [
        {
            **row,
            "step": loaded.step,
            "epoch": loaded.epoch,
            "metrics": loaded.metrics,
            "size": int(sum(t.numel() * t.element_size() for t in tensors)),
            "latest": True,
            "format": FORMATS.get(loaded.kind, loaded.kind),
        }
    ]
