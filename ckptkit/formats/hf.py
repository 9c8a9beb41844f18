"""Hugging Face Trainer ``checkpoint-<N>/`` directories, read without running pickled code.

What the Trainer writes there (transformers 4.x and 5.x), in this order: the weights
(``model.safetensors``, sharded ``model.safetensors.index.json``, or ``pytorch_model.bin``;
under FSDP ``pytorch_model_fsdp.bin`` or a ``pytorch_model_fsdp_0/`` folder) with
``config.json`` and ``training_args.bin``; then, unless ``save_only_model=True``,
``optimizer.pt`` (FSDP: ``optimizer.bin`` or an ``optimizer_0/`` folder), ``scheduler.pt``,
``scaler.pt`` (mixed precision only) and one ``rng_state.pth`` (``rng_state_<rank>.pth``
per process in distributed runs); ``trainer_state.json`` last.
``training_args.bin`` is a pickled ``TrainingArguments`` object: it is never unpickled,
only scanned (opcodes, nothing run) for its ``save_only_model`` flag.

Completeness (:func:`missing_files`, docs/FORMAT.md): a Trainer checkpoint is complete
when ``trainer_state.json`` is there (the Trainer writes it last) and weights are there;
and, when it was saved with optimizer state (``training_args.bin`` says
``save_only_model=False``, or any of the optimizer, scheduler or RNG files is there),
the optimizer, the scheduler and the RNG state of every rank from 0 up to the highest
one found. Every file present must decode. An incomplete or undecodable one raises
``CorruptCheckpointError`` naming the files.
"""

from __future__ import annotations

import json
import math
import pickletools
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ckptkit.errors import CheckpointNotFoundError, CorruptCheckpointError
from ckptkit.formats import pickles
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
    ("pytorch_model_fsdp.bin", False, False),  # FSDP FULL_STATE_DICT
)
_RNG_FILE = re.compile(r"^rng_state(?:_(\d+))?\.pth$")
CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
# FSDP runs: sharded state as torch.distributed.checkpoint folders (not read here).
FSDP_FOLDERS = ("pytorch_model_fsdp_0", "optimizer_0")
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")  # .bin: FSDP full state
# Files that only a Trainer checkpoint holds: a save_pretrained() folder has none, and an
# output dir only trainer_state.json (from trainer.save_state()).
_TRAINER_FILES = (*OPTIMIZER_FILES, "scheduler.pt", "scaler.pt")
ROOT_WEIGHTS_NOTE = (
    "the output dir also holds weights from save_model(): the newest complete checkpoint-N "
    "is restored instead; point at that model.safetensors to load the final weights alone"
)
SAVE_ONLY_MODEL = (
    "saved with save_only_model=True: model weights and trainer_state.json only, "
    "by design (no optimizer, scheduler or RNG state)"
)
# log_history keys that are bookkeeping, not metrics.
_NOT_METRICS = {"step", "epoch", "total_flos", "train_runtime", "train_samples_per_second"}


def is_hf_checkpoint(names: Sequence[str]) -> bool:
    """Whether a directory listing looks like a Trainer checkpoint (or a saved model),
    complete or not."""
    return TRAINER_STATE in names or _has_model(names) or is_trainer_checkpoint(names, "")


def is_trainer_checkpoint(names: Sequence[str], dirname: str) -> bool:
    """A Trainer checkpoint (held to the completeness rule), not a ``save_pretrained``
    folder or an output dir's final ``save_model()``/``save_state()`` files: named
    ``checkpoint-<N>``, or holding optimizer, scheduler or RNG files."""
    return (
        bool(CHECKPOINT_DIR.match(dirname))
        or any(n in names for n in _TRAINER_FILES)
        or any(_RNG_FILE.match(n) for n in names)
    )


def _rng_ranks(names: Sequence[str]) -> list[tuple[int, str]]:
    return sorted((int(m.group(1) or 0), n) for n in names if (m := _RNG_FILE.match(n)))


def saved_only_model(storage: Storage, key: str, names: Sequence[str]) -> bool | None:
    """``save_only_model`` as ``training_args.bin`` records it, or None when it cannot
    tell. The pickle is only scanned: its opcodes are walked, nothing is unpickled."""
    if "training_args.bin" not in names:
        return None
    try:
        data = confined.read_member(
            storage, join_key(key, "training_args.bin"), max_size=confined.MAX_JSON
        )
        pkl, _ = pickles.torch_pickle(data)
        last: Any = None
        for op, arg, _pos in pickletools.genops(pkl):
            if op.name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
                continue
            if last == "save_only_model" and op.name in ("NEWTRUE", "NEWFALSE"):
                return op.name == "NEWTRUE"
            last = arg if isinstance(arg, str) else None
    except (ValueError, OSError, CorruptCheckpointError):
        return None
    return None


def _has_model(names: Sequence[str]) -> bool:
    # FSDP: pytorch_model_fsdp.bin, _rank<k>.bin per process, or a _0/ folder
    return any(f in names for f, _, _ in WEIGHT_FILES) or any(
        n.startswith("pytorch_model_fsdp") for n in names
    )


def missing_files(storage: Storage, key: str, names: Sequence[str]) -> list[str]:
    """What a Trainer checkpoint lacks by the completeness rule (module docstring)."""
    missing: list[str] = []
    if not _has_model(names):
        missing.append("model weights (model.safetensors or pytorch_model.bin)")
    full = any(n in names for n in (*_TRAINER_FILES, "optimizer_0"))
    full = full or bool(_rng_ranks(names)) or saved_only_model(storage, key, names) is False
    if full:
        if not any(n in names for n in (*OPTIMIZER_FILES, "optimizer_0")):
            missing.append("optimizer.pt")
        if "scheduler.pt" not in names:
            missing.append("scheduler.pt")
        ranks = _rng_ranks(names)
        if not ranks:
            missing.append("rng_state.pth")
        elif len(ranks) > 1 or ranks[0][1] != "rng_state.pth":
            have = {r for r, _ in ranks}
            missing.extend(f"rng_state_{r}.pth" for r in range(max(have)) if r not in have)
    for folder in FSDP_FOLDERS:  # DCP writes its .metadata last
        if folder in names and not storage.exists(join_key(key, folder, ".metadata")):
            missing.append(f"{folder}/.metadata")
    if TRAINER_STATE not in names:
        missing.append(TRAINER_STATE)
    return missing


def read_hf_checkpoint(storage: Storage, key: str = "", *, trust: bool = False) -> Loaded:
    """Read a Trainer checkpoint directory into ckptkit's state names: ``model``,
    ``optimizer``, ``scheduler``, ``scaler``, ``rng`` (an ``RNGState`` state), ``step``,
    ``epoch``. The full ``trainer_state.json`` is in ``meta["trainer_state"]``.

    A Trainer checkpoint (``is_trainer_checkpoint``) that is incomplete or holds a file
    that does not decode raises ``CorruptCheckpointError`` naming them; a plain
    ``save_pretrained`` folder is read as the model it holds."""
    names = storage.listdir(key)
    source = storage.url_of(key)
    dirname = (key or source.split("?", 1)[0].rstrip("/")).rsplit("/", 1)[-1]
    strict = is_trainer_checkpoint(names, dirname)
    if strict:
        missing = missing_files(storage, key, names)
        if missing:
            raise CorruptCheckpointError(
                f"{source}: incomplete Trainer checkpoint, missing {', '.join(missing)} "
                "(the Trainer was stopped inside its save?); resume from an older checkpoint-N"
            )
    state: dict[str, Any] = {}
    notes: list[str] = []
    _read_weights(storage, key, names, state, notes, trust)
    optimizer = next((n for n in OPTIMIZER_FILES if n in names), "optimizer.pt")
    for target, fname, missing_note in (
        ("optimizer", optimizer, NO_OPTIMIZER),
        ("scheduler", "scheduler.pt", NO_SCHEDULER),
        ("scaler", "scaler.pt", None),
    ):
        if fname in names:
            state[target] = read_torch(storage, join_key(key, fname), trust=trust)
        elif missing_note:
            notes.append(missing_note)
    if strict and "optimizer" not in state and not any(f in names for f in FSDP_FOLDERS):
        notes.insert(0, SAVE_ONLY_MODEL)
    for folder in FSDP_FOLDERS:
        if folder in names:
            notes.append(
                f"FSDP sharded state in {folder}/ (a torch.distributed.checkpoint folder) "
                "is not read: save with FULL_STATE_DICT to restore it here"
            )
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
        source=source,
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
    ranks = _rng_ranks(names)
    if not ranks:
        notes.append(NO_RNG)
        return
    rank, fname = ranks[0]
    if len(ranks) > 1:
        notes.append(f"RNG state saved for {len(ranks)} processes: using rank {rank}'s ({fname})")
    raw = read_torch(storage, join_key(key, fname), trust=trust)
    for _, other in ranks[1:]:  # decoded too: an unreadable one makes the checkpoint corrupt
        read_torch(storage, join_key(key, other), trust=trust)
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
    return rng_state(raw.get("python"), raw.get("numpy"), raw.get("cpu"), raw.get("cuda", []))


def rng_state(py: Any, np_state: Any, cpu: Any, cuda: Any) -> dict[str, Any] | None:
    """``random.getstate()``, ``np.random.get_state()`` (numpy already turned into
    tensors by ``to_plain``), the CPU generator's state and the CUDA ones, as a
    ``ckptkit.RNGState`` state; None when they are not in those layouts. Shared by the
    Trainer's and accelerate's RNG files."""
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


def verify_dir(
    storage: Storage, key: str = "", *, trust: bool = False
) -> list[dict[str, Any]] | None:
    """``verify``'s results for a Trainer output dir (each ``checkpoint-<N>/``, and the
    ``save_model()`` weights beside them) or one checkpoint, each read in full; None when
    ``key`` is neither."""
    from ckptkit.formats.legacy import read_legacy

    names = storage.listdir(key)
    numbered = sorted(
        (int(m.group(1)), n)
        for n in names
        if (m := CHECKPOINT_DIR.match(n)) and storage.isdir(join_key(key, n))
    )
    if numbered:
        targets = [join_key(key, n) for _, n in numbered] + ([key] if _has_model(names) else [])
    elif is_hf_checkpoint(names):
        targets = [key]
    else:
        return None

    def read(target: str) -> None:
        if target == key:
            read_hf_checkpoint(storage, target, trust=trust)
        elif read_legacy(storage, target, trust=trust) is None:
            raise CorruptCheckpointError(f"{storage.url_of(target)}: no checkpoint in it")

    return verify_each(storage, targets, read)


def verify_each(
    storage: Storage, targets: Sequence[str], read: Callable[[str], object]
) -> list[dict[str, Any]]:
    """``verify``'s ``[{"url", "ok", "problem"}]``: ``read`` (a full, safe read) of each
    target, a damaged or incomplete one reported, not raised. Unsafe files still raise."""
    results: list[dict[str, Any]] = []
    for target in targets:
        url = storage.url_of(target)
        try:
            read(target)
            results.append({"url": url, "ok": True, "problem": None})
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            results.append({"url": url, "ok": False, "problem": str(exc)})
    return results
