"""Hugging Face Trainer ``checkpoint-<N>/`` directories, read without running pickled code.

What the Trainer writes there (transformers 4.x): the weights (``model.safetensors``,
sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``), ``optimizer.pt``,
``scheduler.pt``, ``scaler.pt``, ``trainer_state.json`` and ``rng_state.pth``
(``rng_state_<rank>.pth`` in distributed runs). ``training_args.bin`` is a pickled
``TrainingArguments`` object and is never read.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from ckptkit.errors import CheckpointNotFoundError, CorruptCheckpointError
from ckptkit.formats.base import Loaded
from ckptkit.formats.legacy import (
    NO_LOADER,
    NO_OPTIMIZER,
    NO_RNG,
    NO_SCHEDULER,
    NO_STEP,
    read_safetensors,
    read_torch,
)
from ckptkit.storage import confined
from ckptkit.storage.base import Storage, join_key
from ckptkit.storage.names import UnsafeNameError, check_member_name

TRAINER_STATE = "trainer_state.json"
# Weight files, most preferred first: (file, sharded index?, safetensors?).
WEIGHT_FILES = (
    ("model.safetensors", False, True),
    ("model.safetensors.index.json", True, True),
    ("pytorch_model.bin", False, False),
    ("pytorch_model.bin.index.json", True, False),
    ("adapter_model.safetensors", False, True),  # PEFT: the adapter only
    ("adapter_model.bin", False, False),
)
_RNG_FILE = re.compile(r"^rng_state(?:_(\d+))?\.pth$")
# log_history keys that are bookkeeping, not metrics.
_NOT_METRICS = {"step", "epoch", "total_flos", "train_runtime", "train_samples_per_second"}


def is_hf_checkpoint(names: Sequence[str]) -> bool:
    """Whether a directory listing looks like a Trainer checkpoint (or a saved model)."""
    return TRAINER_STATE in names or any(f in names for f, _, _ in WEIGHT_FILES)


def read_hf_checkpoint(storage: Storage, key: str = "", *, trust: bool = False) -> Loaded:
    """Read a Trainer checkpoint directory into ckptkit's state names: ``model``,
    ``optimizer``, ``scheduler``, ``scaler``, ``rng`` (an ``RNGState`` state), ``step``,
    ``epoch``. The full ``trainer_state.json`` is in ``meta["trainer_state"]``."""
    names = storage.listdir(key)
    state: dict[str, Any] = {}
    notes: list[str] = []
    _read_weights(storage, key, names, state, notes, trust)
    for target, fname, missing in (
        ("optimizer", "optimizer.pt", NO_OPTIMIZER),
        ("scheduler", "scheduler.pt", NO_SCHEDULER),
        ("scaler", "scaler.pt", None),
    ):
        if fname in names:
            state[target] = read_torch(storage, join_key(key, fname), trust=trust)
        elif missing:
            notes.append(missing)
    trainer_state = _trainer_state(storage, key, names)
    step, epoch, metrics = _progress(trainer_state, notes)
    if step is not None:
        state["step"] = step
    if epoch is not None:
        state["epoch"] = epoch
    _read_rng(storage, key, names, state, notes, trust)
    notes.append(NO_LOADER)
    if "training_args.bin" in names:
        notes.append("training_args.bin not read: it is a pickled TrainingArguments object")
    if any(n.startswith("global_step") for n in names):
        notes.append("DeepSpeed states under global_step*/ are not read")
    return Loaded(
        state=state,
        kind="hf-trainer",
        source=storage.url_of(key),
        step=step,
        epoch=epoch,
        metrics=metrics,
        notes=notes,
        meta={"trainer_state": trainer_state} if trainer_state else {},
    )


def _read_weights(
    storage: Storage,
    key: str,
    names: Sequence[str],
    state: dict[str, Any],
    notes: list[str],
    trust: bool,
) -> None:
    for fname, sharded, is_st in WEIGHT_FILES:
        if fname not in names:
            continue
        path = join_key(key, fname)
        if sharded:
            state["model"] = _read_shards(storage, key, path, is_st, trust)
        elif is_st:
            state["model"] = read_safetensors(storage, path)
        else:
            state["model"] = read_torch(storage, path, trust=trust)
        if fname.startswith("adapter_model"):
            notes.append("PEFT adapter weights only: load them into the PEFT-wrapped model")
        return
    notes.append("no model weights in this directory")


def _read_shards(
    storage: Storage, key: str, index_key: str, is_st: bool, trust: bool
) -> dict[str, Any]:
    index = _json(storage, index_key)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpointError(f"{storage.url_of(index_key)}: no weight_map in the index")
    shards: set[str] = set()
    for shard in weight_map.values():
        try:  # shards lie next to the index: plain names, no sub-folders
            shards.add(check_member_name(shard))
        except UnsafeNameError as exc:
            raise CorruptCheckpointError(
                f"{storage.url_of(index_key)}: bad shard name in the weight_map ({exc})"
            ) from None
    merged: dict[str, Any] = {}
    for shard in sorted(shards):
        shard_key = join_key(key, shard)
        try:
            merged.update(
                read_safetensors(storage, shard_key)
                if is_st
                else read_torch(storage, shard_key, trust=trust)
            )
        except CheckpointNotFoundError:
            raise CorruptCheckpointError(
                f"{storage.url_of(shard_key)}: shard listed in the index is missing"
            ) from None
    return merged


def _json(storage: Storage, key: str) -> Any:
    try:
        return json.loads(confined.read_member(storage, key, max_size=confined.MAX_JSON))
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(f"{storage.url_of(key)}: no such file") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{storage.url_of(key)}: not valid JSON ({exc})") from exc


def _trainer_state(storage: Storage, key: str, names: Sequence[str]) -> dict[str, Any]:
    if TRAINER_STATE not in names:
        return {}
    data = _json(storage, join_key(key, TRAINER_STATE))
    if not isinstance(data, dict):
        raise CorruptCheckpointError(
            f"{storage.url_of(join_key(key, TRAINER_STATE))}: not a JSON object"
        )
    return data


def _progress(
    ts: dict[str, Any], notes: list[str]
) -> tuple[int | None, int | None, dict[str, float]]:
    """(step, epoch, metrics) from trainer_state.json.

    The Trainer's epoch is fractional (1.5 = half-way through the second epoch); ours is
    the index of the epoch to resume, so it is rounded down and the position inside the
    epoch is lost (see NO_LOADER)."""
    step = ts.get("global_step")
    step = step if isinstance(step, int) and not isinstance(step, bool) else None
    raw_epoch = ts.get("epoch")
    epoch = (
        math.floor(raw_epoch)
        if isinstance(raw_epoch, (int, float)) and math.isfinite(raw_epoch)
        else None
    )
    if step is None and epoch is None:
        notes.append(NO_STEP)
    elif isinstance(raw_epoch, float) and not raw_epoch.is_integer():
        notes.append(
            f"trainer_state.json has epoch {raw_epoch}: resuming at the start of epoch {epoch}"
        )
    metrics: dict[str, float] = {}
    for entry in ts.get("log_history") or []:
        if isinstance(entry, dict):
            metrics.update(
                (k, float(v))
                for k, v in entry.items()
                if k not in _NOT_METRICS
                and isinstance(v, (int, float))
                and not isinstance(v, bool)
                and math.isfinite(v)
            )
    best = ts.get("best_metric")
    if isinstance(best, (int, float)) and math.isfinite(best):
        metrics["best_metric"] = float(best)
    return step, epoch, metrics


def _read_rng(
    storage: Storage,
    key: str,
    names: Sequence[str],
    state: dict[str, Any],
    notes: list[str],
    trust: bool,
) -> None:
    ranks = sorted((int(m.group(1) or 0), n) for n in names if (m := _RNG_FILE.match(n)))
    if not ranks:
        notes.append(NO_RNG)
        return
    rank, fname = ranks[0]
    if len(ranks) > 1:
        notes.append(f"RNG state saved for {len(ranks)} processes: using rank {rank}'s ({fname})")
    raw = read_torch(storage, join_key(key, fname), trust=trust)
    rng = rng_state_from_hf(raw)
    if rng is None:
        state["hf_rng"] = raw
        notes.append(f"{fname} is not in the Trainer's usual layout: kept as state['hf_rng']")
        return
    state["rng"] = rng
    dropped = sorted(set(raw) - {"python", "numpy", "cpu", "cuda"})
    if dropped:
        notes.append(f"RNG state for {', '.join(dropped)} not restored (ckptkit.RNGState has none)")


def rng_state_from_hf(raw: Any) -> dict[str, Any] | None:
    """The Trainer's ``{"python": random.getstate(), "numpy": np.random.get_state(),
    "cpu": ..., "cuda": ...}`` (numpy already turned into tensors by ``to_plain``) as a
    ``ckptkit.RNGState`` state, or None when it is not in that layout."""
    if not isinstance(raw, dict):
        return None
    py, np_state, cpu = raw.get("python"), raw.get("numpy"), raw.get("cpu")
    cuda = raw.get("cuda", [])
    if not (isinstance(py, tuple) and len(py) == 3 and isinstance(py[1], tuple)):
        return None
    if not (
        isinstance(np_state, tuple) and len(np_state) == 5 and isinstance(np_state[1], torch.Tensor)
    ):
        return None
    if not isinstance(cpu, torch.Tensor):
        return None
    # single-process runs save one device's state, distributed ones a list of all devices'
    cuda = [cuda] if isinstance(cuda, torch.Tensor) else list(cuda)
    name, keys, pos, has_gauss, cached = np_state
    return {
        "python": {
            "version": py[0],
            "internal": torch.tensor(py[1], dtype=torch.int64),
            "gauss_next": py[2],
        },
        "numpy": {
            "bit_generator": name,
            "keys": keys.to(torch.int64),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": cpu,
        "cuda": cuda,
        "generators": [],
    }
