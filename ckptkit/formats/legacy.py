"""Readers for checkpoints written without ckptkit.

- a bare ``torch.save(model.state_dict(), path)`` (upstream Time-LLM's
  ``checkpoints/<setting>/checkpoint``): ``kind="legacy-state-dict"``;
- a dict checkpoint such as the Colab Time-LLM scripts' ``{'model', 'optimizer',
  'scheduler', 'epoch', 'global_step', 'best_score', 'val_loss_min'}``, or one with other
  common key names (``model_state_dict``, ``iteration``...): ``kind="legacy-dict"``;
- a Hugging Face Trainer ``checkpoint-<N>/`` directory (see ``hf.py``): ``kind="hf-trainer"``.

Everything is read through ``safe_torch_load``: nothing in the files is executed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from ckptkit.errors import CheckpointNotFoundError, CorruptCheckpointError
from ckptkit.formats import native
from ckptkit.formats.base import Loaded
from ckptkit.formats.safe import safe_torch_load
from ckptkit.run import warn
from ckptkit.storage import confined
from ckptkit.storage.base import Storage, join_key

# Top-level names in the wild, most specific first; only the first one present is mapped.
MODEL_KEYS = ("model", "model_state_dict", "state_dict", "model_state", "net")
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optimizer_state", "optim")
SCHEDULER_KEYS = ("scheduler", "lr_scheduler", "scheduler_state_dict", "lr_scheduler_state_dict")
SCALER_KEYS = ("scaler", "grad_scaler", "scaler_state_dict", "amp")
STEP_KEYS = ("global_step", "step", "iteration", "iter", "iter_num", "num_updates")
EPOCH_KEYS = ("epoch", "epochs")
# PyTorch Lightning keeps one state per optimizer/scheduler in a list.
OPTIMIZER_LIST_KEYS = ("optimizer_states",)
SCHEDULER_LIST_KEYS = ("lr_schedulers",)

# Files a directory may hold a legacy checkpoint in: these names, and any name with a
# checkpoint suffix (nanoGPT's ckpt.pt, Lightning's last.ckpt and epoch=3-step=100.ckpt,
# model_best.pth.tar). A directory with several is listed, never guessed from.
CHECKPOINT_FILES = ("checkpoint.pt", "checkpoint", "checkpoint.pth", "model.pt", "model.pth")
CANDIDATE_SUFFIXES = (".pt", ".pth", ".ckpt", ".tar", ".safetensors")
STEP_DIR = re.compile(r"^checkpoint_step_(\d+)$")  # Colab Time-LLM scripts
HF_STEP_DIR = re.compile(r"^checkpoint-(\d+)$")  # Hugging Face Trainer output_dir
# torchtitan's checkpoint/step-<N>/ DCP directories (never 12 digits: ckptkit's own names).
DCP_STEP_DIR = re.compile(r"^step-(\d{1,11})$")

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"  # the PROTO opcode every torch.save pickle starts with

NO_OPTIMIZER = "no optimizer state: optimizer moments restart from zero"
NO_SCHEDULER = "no scheduler state: the learning-rate schedule restarts from its start"
NO_RNG = "no RNG state: data order will differ"
NO_LOADER = "no data-loader position: the epoch restarts from its first batch"
NO_STEP = "no step/epoch: training restarts at step 0"
NO_EARLY_STOPPING = "no early-stopping state: the best score starts fresh"

# Time-LLM's run_main.py defaults, used where a file keeps the best score but not these.


def read_legacy(storage: Storage, key: str = "", *, trust: bool = False) -> Loaded | None:
    """Read the legacy checkpoint at ``key`` (a file or a directory), or None when it is
    not a format we know. Raises ``CorruptCheckpointError`` for a file that is a checkpoint
    but cannot be decoded, ``UnsafeCheckpointError`` for one that would run code."""
    if storage.isdir(key):
        return _read_dir(storage, key, trust)
    if not storage.exists(key):
        return None
    return _read_file(storage, key, trust)


def _read_dir(storage: Storage, key: str, trust: bool) -> Loaded | None:
    from ckptkit.formats import dcp, hf

    names = storage.listdir(key)
    if "manifest.json" in names:
        return None  # a native checkpoint: not ours to read
    if dcp.METADATA in names:
        return dcp.read_dcp(storage, key, trust=trust)
    dcp.check_not_interrupted(storage, key)
    from ckptkit.formats import accelerate

    found = accelerate.read_dir(storage, key, names, trust)
    if found is not None:
        return found
    # checkpoint-N/ folders before the folder's own weights: an output dir that also
    # holds save_model()'s model.safetensors resumes from its newest complete checkpoint.
    for pattern in (STEP_DIR, HF_STEP_DIR, DCP_STEP_DIR):
        numbered = sorted(
            ((int(m.group(1)), n) for n in names if (m := pattern.match(n))), reverse=True
        )
        if numbered:
            loaded = _newest_loadable(storage, key, numbered, trust)
            others = [n for n in CHECKPOINT_FILES if n in names]
            if hf.is_hf_checkpoint(names):
                loaded.notes.append(hf.ROOT_WEIGHTS_NOTE)
            elif others:
                loaded.notes.append(
                    f"also found {others[0]} next to the step directories (upstream Time-LLM "
                    "saves the best model there): point at it to load it instead"
                )
            return loaded
    if hf.is_hf_checkpoint(names):
        return hf.read_hf_checkpoint(storage, key, trust=trust)
    candidates = _candidates(storage, key, names)
    if len(candidates) > 1:
        url = storage.url_of(key).rstrip("/")
        shown = ", ".join(candidates[:10]) + (" ..." if len(candidates) > 10 else "")
        raise CheckpointNotFoundError(
            f"{url}: holds {len(candidates)} checkpoint files ({shown}): name the one to "
            f"read, e.g. {url}/{candidates[0]}"
        )
    return _read_file(storage, join_key(key, candidates[0]), trust) if candidates else None


def _files(storage: Storage, key: str, names: list[str], under: str = "") -> list[str]:
    return [
        under + n
        for n in sorted(names)
        if (n in CHECKPOINT_FILES or n.endswith(CANDIDATE_SUFFIXES))
        and not n.startswith(".")
        and not storage.isdir(join_key(key, n))
    ]


def _sniffed(storage: Storage, key: str, names: list[str]) -> list[str]:
    """Safetensors files named without the suffix (``weights``), by their first bytes;
    only the first few dozen plain files of a folder are looked at."""
    found = []
    for name in sorted(n for n in names if not n.startswith("."))[:64]:
        sub = join_key(key, name)
        if storage.isdir(sub):
            continue
        try:
            with confined.open_member(storage, sub) as member:
                if _looks_safetensors(member.head(9), member.size):
                    found.append(name)
        except (FileNotFoundError, CorruptCheckpointError):
            continue  # a link, FIFO... is not a candidate; naming it reports why
    return found


def _candidates(storage: Storage, key: str, names: list[str]) -> list[str]:
    """The checkpoint files of a folder (relative names); when it has none, those in
    Lightning's folders below a Trainer's ``default_root_dir``: ``checkpoints/`` (no
    logger) and ``lightning_logs/version_<N>/checkpoints/``."""
    found = _files(storage, key, names) or _sniffed(storage, key, names)
    if found:
        return found
    subs = ["checkpoints"] if "checkpoints" in names else []
    logs = join_key(key, "lightning_logs")
    if "lightning_logs" in names and storage.isdir(logs):
        versions = sorted(v for v in storage.listdir(logs) if v.startswith("version_"))
        subs += [f"lightning_logs/{v}/checkpoints" for v in versions]
    for sub in subs:
        folder = join_key(key, sub)
        if storage.isdir(folder):
            found += _files(storage, folder, storage.listdir(folder), f"{sub}/")
    return found


def _newest_loadable(
    storage: Storage, key: str, numbered: list[tuple[int, str]], trust: bool
) -> Loaded:
    """The checkpoint in the highest-numbered directory that loads; damaged ones are
    skipped with a warning (a preempted save often leaves the newest one truncated)."""
    skipped: list[str] = []
    for number, name in numbered:
        sub = join_key(key, name)
        try:
            loaded = read_legacy(storage, sub, trust=trust)
        except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
            reason = str(exc)
        else:
            if loaded is not None:
                _adopt_step(loaded, number, name)
                if skipped:
                    loaded.notes.append(
                        f"skipped newer checkpoints that do not load: {', '.join(skipped)}"
                    )
                    loaded.meta["skipped"] = skipped
                return loaded
            reason = f"{storage.url_of(sub)}: no checkpoint file in it"
        skipped.append(name)
        warn(f"skipping {reason}")
    raise CorruptCheckpointError(
        f"{storage.url_of(key)}: none of {len(numbered)} checkpoint directories loads "
        f"({', '.join(skipped[:4])}{' ...' if len(skipped) > 4 else ''}): see the warnings above"
    )


def _adopt_step(loaded: Loaded, number: int, name: str) -> None:
    # The directory name is written by the same code that wrote global_step, so it is a
    # fair stand-in when the file itself does not say.
    if loaded.step is None:
        loaded.step = number
        loaded.state.setdefault("step", number)  # never over an entry of the file's own
        loaded.notes = [n for n in loaded.notes if n != NO_STEP]
        loaded.notes.append(f"step {number} taken from the directory name {name}")


def _read_file(storage: Storage, key: str, trust: bool) -> Loaded | None:
    source = storage.url_of(key)
    name = key.rsplit("/", 1)[-1] if key else source.rstrip("/").rsplit("/", 1)[-1]
    if name.endswith(".safetensors"):
        return state_dict_checkpoint(read_safetensors(storage, key), source)
    with _open(storage, key) as member:
        head = member.head(9)
        if not head:
            raise CorruptCheckpointError(f"{source}: empty file (a save was interrupted?)")
        if _looks_safetensors(head, member.size):  # by content: the name may lack the suffix
            return state_dict_checkpoint(native.read_safetensors(member, source), source)
        looks_torch = head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTO)
        if not looks_torch and not (name == "checkpoint" or name.endswith(_TORCH_SUFFIXES)):
            return None  # not a torch file, and not named like one: not ours
        obj = safe_torch_load(member.file(), source=source, trust=trust)
    return from_object(obj, source)


def _looks_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file: an 8-byte little-endian header length that fits the file,
    then the JSON header's ``{``."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 2 <= int.from_bytes(head[:8], "little") <= size - 8


def _open(storage: Storage, key: str) -> confined.Member:
    """A foreign file, opened confined: a regular file inside the storage (the path the
    user named may itself be a link to one), read up to the size ``fstat`` reports."""
    try:
        return confined.open_member(storage, key)
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(f"{storage.url_of(key)}: no such file") from exc


def read_torch(storage: Storage, key: str, *, trust: bool = False) -> Any:
    """``safe_torch_load`` of one file in ``storage``, opened confined (read from the
    checked descriptor, never mapped: ``formats/safe.py``)."""
    with _open(storage, key) as member:
        return safe_torch_load(member.file(), source=storage.url_of(key), trust=trust)


def read_safetensors(storage: Storage, key: str) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file in ``storage``, opened confined, each read
    into fresh memory (``native.read_safetensors``)."""
    with _open(storage, key) as member:
        return native.read_safetensors(member, storage.url_of(key))


def is_state_dict(obj: Any) -> bool:
    """A flat, non-empty mapping of names to tensors: what ``module.state_dict()`` returns."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def from_object(obj: Any, source: str) -> Loaded | None:
    """Classify what a legacy file held: a bare state dict, a dict checkpoint, or (None)
    something we do not know how to map. Whole pickled modules (only loaded under
    ``trust=True``) are taken as their ``state_dict()``."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    elif isinstance(obj, Mapping) and any(isinstance(v, torch.nn.Module) for v in obj.values()):
        obj = {k: v.state_dict() if isinstance(v, torch.nn.Module) else v for k, v in obj.items()}
    if is_state_dict(obj):
        return state_dict_checkpoint(obj, source)
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) for k in obj):
        return dict_checkpoint(obj, source)
    return None


def state_dict_checkpoint(sd: Mapping[str, torch.Tensor], source: str) -> Loaded:
    """A model's weights and nothing else."""
    notes = [
        "model weights only (a bare state_dict)",
        NO_OPTIMIZER,
        NO_SCHEDULER,
        NO_RNG,
        NO_STEP,
        NO_LOADER,
        NO_EARLY_STOPPING,
    ]
    notes.extend(_prefix_notes(sd))
    return Loaded(state={"model": sd}, kind="legacy-state-dict", source=source, notes=notes)


_WRAPPERS = {"module.": "a DataParallel/DDP wrapper", "_orig_mod.": "a torch.compile'd model"}


def _prefix_notes(sd: Mapping[str, Any]) -> list[str]:
    # load/inspect keep the names as stored; restore maps them (formats/prefixes.py).
    for prefix, wrapper in _WRAPPERS.items():
        if sd and all(isinstance(k, str) and k.startswith(prefix) for k in sd):
            return [
                f"weight names start with '{prefix}' (saved from {wrapper}): restore "
                "strips it where the target model's names lack it"
            ]
    return []


def _first(
    obj: Mapping[str, Any], keys: tuple[str, ...], want: type | tuple[type, ...]
) -> str | None:
    return next((k for k in keys if isinstance(obj.get(k), want)), None)


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value.item())
    return None


def dict_checkpoint(obj: Mapping[str, Any], source: str) -> Loaded:
    """A dict checkpoint, two views of it.

    ``contents`` (what ``ckptkit.load`` returns) is every entry of the file under its own
    name. ``state`` (what ``restore`` reads) is the same entries plus aliases under
    ckptkit's state names for the well-known ones (``model_state_dict`` -> ``model``,
    ``global_step`` -> ``step``, ``val_loss_min``/``best_score`` -> ``early_stopping``...):
    it may add keys, never drop or replace one of the file's. An alias whose name the file
    already uses for something else is not added."""
    contents = dict(obj)
    aliases: dict[str, Any] = {}
    notes: list[str] = []

    def alias(target: str, found: str | None, value: Any) -> bool:
        if found is None:
            return False
        if target in contents and found != target:
            notes.append(
                f"'{found}' is not restored as '{target}': the file has its own '{target}' "
                "entry, restored as it is"
            )
        else:
            aliases[target] = value
        return True

    def take(target: str, keys: tuple[str, ...], want: type | tuple[type, ...]) -> bool:
        found = _first(obj, keys, want)
        return alias(target, found, None if found is None else obj[found])

    if take("model", MODEL_KEYS, Mapping):
        notes.extend(_prefix_notes(aliases.get("model", {})))
    else:
        notes.append(
            f"no model weights under any of {', '.join(MODEL_KEYS)}: entries are kept under "
            "their own names"
        )
    if not take("optimizer", OPTIMIZER_KEYS, Mapping) and not alias(
        "optimizer", *_single(obj, OPTIMIZER_LIST_KEYS)
    ):
        notes.append(NO_OPTIMIZER)
    if not take("scheduler", SCHEDULER_KEYS, Mapping) and not alias(
        "scheduler", *_single(obj, SCHEDULER_LIST_KEYS)
    ):
        # Colab scripts save 'scheduler': None when the schedule is stepped by hand; restore
        # takes a None entry as no state.
        notes.append(NO_SCHEDULER)
    take("scaler", SCALER_KEYS, Mapping)

    step_key, step = _number(obj, STEP_KEYS)
    alias("step", step_key, step)
    epoch_key, epoch = _number(obj, EPOCH_KEYS)
    alias("epoch", epoch_key, epoch)
    if step is None and epoch is None:
        notes.append(NO_STEP)

    early = _early_stopping(obj)
    if early is not None:
        alias("early_stopping", "val_loss_min/best_score", early)
    if "early_stopping" in aliases:
        notes.append(
            "early stopping: best value from val_loss_min/best_score; patience and delta "
            "were not saved (your EarlyStopping's own are kept), the counter restarts at 0"
        )
    else:
        notes.append(NO_EARLY_STOPPING)
    notes.extend([NO_RNG, NO_LOADER])
    return Loaded(
        state={**contents, **aliases},
        kind="legacy-dict",
        source=source,
        step=step,
        epoch=epoch,
        metrics=_metrics(obj),
        notes=notes,
        contents=contents,
    )


def _single(obj: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[str | None, Any]:
    """The one state in a one-element list (PyTorch Lightning's ``optimizer_states``)."""
    for k in keys:
        value = obj.get(k)
        if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], Mapping):
            return k, value[0]
    return None, None


def _number(obj: Mapping[str, Any], keys: tuple[str, ...]) -> tuple[str | None, int | None]:
    for k in keys:
        if k in obj and (value := _as_int(obj[k])) is not None:
            return k, value
    return None, None


def _metrics(obj: Mapping[str, Any]) -> dict[str, float]:
    # Finite top-level floats (loss, val_loss_min, best_acc...) are the only metrics a
    # dict checkpoint has; infinities (val_loss_min before the first validation) say nothing.
    out: dict[str, float] = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1 and v.is_floating_point():
            v = v.item()
        if isinstance(v, float) and math.isfinite(v):
            out[k] = v
    return out


def _early_stopping(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    """Time-LLM's EarlyStopping keeps ``val_loss_min`` (best validation loss, ``inf``
    before the first) and ``best_score = -val_loss_min``; build a ``ckptkit.EarlyStopping``
    state (mode "min") from them."""
    if "val_loss_min" not in obj and "best_score" not in obj:
        return None
    best: float | None = None
    loss_min, score = obj.get("val_loss_min"), obj.get("best_score")
    if isinstance(loss_min, (int, float)) and math.isfinite(loss_min):
        best = float(loss_min)
    elif isinstance(score, (int, float)) and math.isfinite(score):
        best = -float(score)
    # No patience/delta: the file never had them, so the user's EarlyStopping keeps its own.
    return {
        "mode": "min",
        "best": best,
        "best_step": None,
        "counter": 0,
        "should_stop": False,
        "steps": 0,
    }
