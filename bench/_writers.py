"""Every way the benchmarks save and restore the same training state: the disk itself,
``torch.save``, safetensors, ``torch.distributed.checkpoint`` and ckptkit (sync and,
where this build has it, async), each used as its documentation says, each durable
(fsync'd) before it counts as saved.

A ``Saver`` writes ``(model, opt)`` under a directory of its own; a ``Loader`` reads that
back into the same objects. The save, restore and memory benchmarks all go through
these, so each row of every table measures the same code.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import _state

Model = nn.Module
Opt = torch.optim.Optimizer


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file under ``root`` and the directories, as a durable save must."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fsync_file(os.path.join(dirpath, name))
        fsync_file(dirpath)


def _payload(model: Model, opt: Opt) -> dict[str, Any]:
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


# -- the disk ---------------------------------------------------------------------------
def raw_buffers(model: Model, opt: Opt) -> list[memoryview]:
    """The state's bytes as buffers over the tensors' own memory (the few non-contiguous
    ones copied once), prepared before timing: the disk row measures only the disk."""
    views = []
    for t in _state.tensors(model, opt):
        flat = t.contiguous().view(-1).view(torch.uint8)
        views.append(memoryview(flat.numpy()))
    return views


def raw_write(buffers: list[memoryview], path: Path) -> None:
    with open(path, "wb") as f:
        for buf in buffers:
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())


# -- torch.save -------------------------------------------------------------------------
def torch_save(model: Model, opt: Opt, root: Path) -> None:
    with open(root / "state.pt", "wb") as f:
        torch.save(_payload(model, opt), f)
        f.flush()
        os.fsync(f.fileno())


def torch_load(model: Model, opt: Opt, root: Path) -> None:
    payload = torch.load(root / "state.pt", weights_only=True)
    model.load_state_dict(payload["model"])
    opt.load_state_dict(payload["optimizer"])


# -- safetensors ------------------------------------------------------------------------
def _flat(model: Model, opt: Opt) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What a safetensors user writes: tied weights once (``save_file`` refuses shared
    tensors), non-contiguous ones made contiguous (it refuses those too), the optimizer's
    tensors under flat names and its param groups as JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, t in model.state_dict().items():
        if t.data_ptr() in first:
            tied[name] = first[t.data_ptr()]
            continue
        first[t.data_ptr()] = name
        tensors[f"model.{name}"] = t.contiguous()
    osd = opt.state_dict()
    for index, per_param in osd["state"].items():
        for key, value in per_param.items():
            tensors[f"optimizer.{index}.{key}"] = value.contiguous()
    meta = {"param_groups": json.dumps(osd["param_groups"]), "tied": json.dumps(tied)}
    return tensors, meta


def safetensors_save(model: Model, opt: Opt, root: Path) -> None:
    from safetensors.torch import save_file

    tensors, meta = _flat(model, opt)
    save_file(tensors, root / "state.safetensors", metadata=meta)
    fsync_file(root / "state.safetensors")


def safetensors_load(model: Model, opt: Opt, root: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = root / "state.safetensors"
    flat = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    msd = {k.removeprefix("model."): v for k, v in flat.items() if k.startswith("model.")}
    # A tied weight was written once; strict loading wants every name.
    for name, original in json.loads(meta["tied"]).items():
        msd[name] = msd[original]
    model.load_state_dict(msd)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})


# -- torch.distributed.checkpoint -------------------------------------------------------
def _dcp_kwargs(fn: Callable[..., Any]) -> dict[str, Any]:
    # One process, no process group: torch >= 2.4 takes no_dist=True for that; older
    # ones guess it (with a warning, silenced by the caller).
    return {"no_dist": True} if "no_dist" in inspect.signature(fn).parameters else {}


def dcp_save(model: Model, opt: Opt, root: Path) -> None:
    import torch.distributed.checkpoint as dcp

    target = root / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The default FileSystemWriter: one file per rank, fsynced (sync_files=True), the
        # previous checkpoint overwritten in place (overwrite=True), as torch.save does.
        dcp.save(_payload(model, opt), checkpoint_id=str(target), **_dcp_kwargs(dcp.save))
    fsync_file(target)


def dcp_load(model: Model, opt: Opt, root: Path) -> None:
    import torch.distributed.checkpoint as dcp

    payload = _payload(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(payload, checkpoint_id=str(root / "dcp"), **_dcp_kwargs(dcp.load))
    model.load_state_dict(payload["model"])
    opt.load_state_dict(payload["optimizer"])


# -- ckptkit ----------------------------------------------------------------------------
def has_async_save() -> bool:
    """Whether this build's CheckpointManager takes ``async_save=`` (issue 10, item 4)."""
    from ckptkit import CheckpointManager

    return "async_save" in inspect.signature(CheckpointManager).parameters


def has_snapshot(options: dict[str, Any]) -> bool:
    """Whether this build takes async saves with these options (``async_snapshot``)."""
    if not has_async_save():
        return False
    wanted = options.get("async_snapshot")
    if wanted is None:
        return True
    from ckptkit import asyncsave

    return wanted in getattr(asyncsave, "SNAPSHOTS", ())


def manager(url: str, *, async_save: bool = False, **kwargs: Any) -> Any:
    """A CheckpointManager that keeps one checkpoint (a bench saves the same state over
    and over; rotation runs as in any real run)."""
    from ckptkit import CheckpointManager

    if async_save:
        kwargs["async_save"] = True
    return CheckpointManager(url, keep_last=1, keep_best=0, run_name="bench", **kwargs)


def ckptkit_state(model: Model, opt: Opt) -> dict[str, Any]:
    return {"model": model, "optimizer": opt}
