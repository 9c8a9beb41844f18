"""accelerate ``Accelerator.save_state(dir)`` folders, read without running pickled code.

What accelerate 1.x writes there, in this order: one weights file per prepared model
(``model.safetensors``, ``model_1.safetensors``...; ``pytorch_model.bin``,
``pytorch_model_1.bin``... with ``safe_serialization=False``), ``optimizer.bin``,
``optimizer_1.bin``..., ``scheduler.bin``, ``scheduler_1.bin``..., ``sampler.bin`` (a
pickled sampler object: never read) or ``dl_state_dict.bin``, ``scaler.pt``, one
``random_states_<rank>.pkl`` per process, then ``custom_checkpoint_<i>.pkl`` for each
object passed to ``register_for_checkpointing``. With ``automatic_checkpoint_naming``
the folders are ``<project_dir>/checkpoints/checkpoint_<i>/`` (``i`` counts saves, it is
not a training step).

Every file is a ``torch.save`` pickle or safetensors and goes through the safe loaders:
accelerate itself loads them with ``weights_only=False``, we never do.

State names (the keys of a ``state`` dict to restore into): each file's stem —
``model``, ``model_1``, ``optimizer``, ``optimizer_1``, ``scheduler``, ``scheduler_1``,
``scaler``, ``dl_state_dict``, ``custom_checkpoint_0``... — and ``rng`` (an ``RNGState``
state from rank 0's ``random_states_0.pkl``).

Complete (:func:`missing_files`): at least one model, ``random_states_0.pkl``, and no
gap in any numbered series (``model``, ``optimizer``, ``scheduler``, ``random_states``,
``custom_checkpoint``); every file decodes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ckptkit.errors import CheckpointNotFoundError, CorruptCheckpointError
from ckptkit.formats import hf
from ckptkit.formats.base import Loaded
from ckptkit.formats.legacy import NO_LOADER, NO_STEP, read_safetensors, read_torch
from ckptkit.run import warn
from ckptkit.storage.base import Storage, join_key

# (state name, file stem, suffix): index 0 is "<stem><suffix>", i is "<stem>_<i><suffix>",
# restored as "<name>" and "<name>_<i>".
_SERIES = tuple(
    (re.compile(rf"^{stem}(?:_(\d+))?{re.escape(suffix)}$"), name, stem, suffix)
    for name, stem, suffix in (
        ("model", "model", ".safetensors"),
        ("model", "pytorch_model", ".bin"),
        ("optimizer", "optimizer", ".bin"),
        ("scheduler", "scheduler", ".bin"),
        ("dl_state_dict", "dl_state_dict", ".bin"),
    )
)
# Always numbered, from 0.
_CUSTOM = re.compile(r"^custom_checkpoint_(\d+)\.pkl$")
_RNG = re.compile(r"^random_states_(\d+)\.pkl$")
_SAMPLER = re.compile(r"^sampler(?:_\d+)?\.bin$")
_OWN = re.compile(r"^(?:optimizer|scheduler)(?:_\d+)?\.bin$")
CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)$")  # automatic_checkpoint_naming


def state_name(base: str, index: int) -> str:
    """The state name of the ``index``-th object of a series: ``model``, ``model_1``..."""
    return base if index == 0 else f"{base}_{index}"


def is_accelerate_dir(names: Sequence[str]) -> bool:
    """A ``save_state`` folder: accelerate's own file names, and none of the Trainer's
    (an FSDP Trainer checkpoint also holds ``optimizer.bin``)."""
    if hf.TRAINER_STATE in names or any(hf._RNG_FILE.match(n) for n in names):
        return False
    return any(_RNG.match(n) or _CUSTOM.match(n) or _OWN.match(n) for n in names)


def _numbered(pattern: re.Pattern[str], names: Sequence[str]) -> dict[int, str]:
    return {int(m.group(1) or 0): n for n in names if (m := pattern.match(n))}


def missing_files(names: Sequence[str]) -> list[str]:
    """What a ``save_state`` folder lacks by the completeness rule (module docstring)."""
    missing: list[str] = []
    if not any(_numbered(p, names) for p, name, _, _ in _SERIES if name == "model"):
        missing.append("model.safetensors (or pytorch_model.bin)")
    for pattern, _, stem, suffix in _SERIES:
        have = _numbered(pattern, names)
        missing += [
            f"{stem}_{i}{suffix}" if i else f"{stem}{suffix}"
            for i in range(max(have, default=-1))
            if i not in have
        ]
    for pattern, stem in ((_CUSTOM, "custom_checkpoint"), (_RNG, "random_states")):
        have = _numbered(pattern, names)
        top = max(have, default=0 if pattern is _RNG else -1)
        missing += [f"{stem}_{i}.pkl" for i in range(top + 1) if i not in have]
    return missing


def read_accelerate(storage: Storage, key: str = "", *, trust: bool = False) -> Loaded:
    """Read a ``save_state`` folder (see the module docstring); an incomplete one, or one
    holding a file that does not decode, raises ``CorruptCheckpointError`` naming it."""
    names = storage.listdir(key)
    source = storage.url_of(key)
    missing = missing_files(names)
    if missing:
        raise CorruptCheckpointError(
            f"{source}: incomplete accelerate save_state folder, missing {', '.join(missing)} "
            "(the save was interrupted?); restore an older one"
        )
    state: dict[str, Any] = {}
    notes: list[str] = []
    for pattern, base, _, _ in _SERIES:
        for i, fname in sorted(_numbered(pattern, names).items()):
            name = state_name(base, i)
            path = join_key(key, fname)
            is_st = fname.endswith(".safetensors")
            state[name] = (
                read_safetensors(storage, path) if is_st else read_torch(storage, path, trust=trust)
            )
    for i, fname in sorted(_numbered(_CUSTOM, names).items()):
        state[f"custom_checkpoint_{i}"] = read_torch(storage, join_key(key, fname), trust=trust)
    if "scaler.pt" in names:
        state["scaler"] = read_torch(storage, join_key(key, "scaler.pt"), trust=trust)
    _read_rng(storage, key, names, state, notes, trust)
    if any(_SAMPLER.match(n) for n in names):
        notes.append("sampler.bin not read: it is a pickled sampler object (its epoch restarts)")
    if "dl_state_dict" not in state:
        notes.append(NO_LOADER)
    notes.append(NO_STEP)
    return Loaded(state=state, kind="accelerate", source=source, notes=notes)


def _read_rng(
    storage: Storage,
    key: str,
    names: Sequence[str],
    state: dict[str, Any],
    notes: list[str],
    trust: bool,
) -> None:
    ranks = sorted(_numbered(_RNG, names).items())
    raws = [read_torch(storage, join_key(key, fname), trust=trust) for _, fname in ranks]
    raw = raws[0]
    if len(ranks) > 1:
        notes.append(f"RNG state saved for {len(ranks)} processes: using rank 0's")
    rng = (
        hf.rng_state(
            raw.get("random_state"),
            raw.get("numpy_random_seed"),
            raw.get("torch_manual_seed"),
            raw.get("torch_cuda_manual_seed", []),
        )
        if isinstance(raw, dict)
        else None
    )
    if rng is None:
        state["accelerate_rng"] = raw
        notes.append(
            f"{ranks[0][1]} is not in accelerate's usual layout: kept as state['accelerate_rng']"
        )
        return
    state["rng"] = rng
    known = {
        "step",
        "random_state",
        "numpy_random_seed",
        "torch_manual_seed",
        "torch_cuda_manual_seed",
    }
    dropped = sorted(set(raw) - known)
    if dropped:
        notes.append(f"RNG state for {', '.join(dropped)} not restored (ckptkit.RNGState has none)")


def _numbered_dirs(storage: Storage, key: str, names: Sequence[str]) -> list[tuple[int, str]]:
    return sorted(
        (
            (int(m.group(1)), n)
            for n in names
            if (m := CHECKPOINT_DIR.match(n)) and storage.isdir(join_key(key, n))
        ),
        reverse=True,
    )


def read_dir(storage: Storage, key: str, names: Sequence[str], trust: bool) -> Loaded | None:
    """A ``save_state`` folder, or the newest complete one of a ``checkpoints/`` folder of
    ``checkpoint_<i>/`` (damaged ones skipped with a warning); None when neither."""
    if is_accelerate_dir(names):
        return read_accelerate(storage, key, trust=trust)
    numbered = [
        (i, n)
        for i, n in _numbered_dirs(storage, key, names)
        if is_accelerate_dir(storage.listdir(join_key(key, n)))
    ]
    skipped: list[str] = []
    for _, name in numbered:
        try:
            loaded = read_accelerate(storage, join_key(key, name), trust=trust)
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            skipped.append(name)
            warn(f"skipping {exc}")
            continue
        if skipped:
            loaded.notes.append(f"skipped newer saves that do not load: {', '.join(skipped)}")
            loaded.meta["skipped"] = skipped
        return loaded
    if skipped:
        raise CorruptCheckpointError(
            f"{storage.url_of(key)}: none of {len(skipped)} accelerate save_state folders "
            "loads: see the warnings above"
        )
    return None


def verify_dir(
    storage: Storage, key: str = "", *, trust: bool = False
) -> list[dict[str, Any]] | None:
    """``verify``'s results for a ``save_state`` folder or each ``checkpoint_<i>/`` of a
    ``checkpoints/`` folder; None when ``key`` is neither."""
    names = storage.listdir(key)
    if is_accelerate_dir(names):
        targets = [key]
    else:
        targets = [
            join_key(key, n)
            for _, n in reversed(_numbered_dirs(storage, key, names))
            if is_accelerate_dir(storage.listdir(join_key(key, n)))
        ]
    if not targets:
        return None
    return hf.verify_each(storage, targets, lambda t: read_accelerate(storage, t, trust=trust))
