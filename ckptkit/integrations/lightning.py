"""Lightning checkpoints written through ckptkit: ``Trainer(plugins=[CkptkitCheckpointIO(url)])``.

    from ckptkit.integrations.lightning import CkptkitCheckpointIO
    io = CkptkitCheckpointIO("gs://bucket/run1")          # or a path, drive://, memory://
    trainer = Trainer(plugins=[io], callbacks=[ModelCheckpoint(every_n_train_steps=500)])
    trainer.fit(model, data, ckpt_path=io.resume_path())  # None on a fresh run

What a caller may rely on (docs/INTEGRATIONS.md):

- Every ``save_checkpoint(checkpoint, path)`` commits one native ckptkit checkpoint of the
  run (manifest last, verified on read) at step ``checkpoint["global_step"]``: the keys of
  Lightning's dict are the checkpoint's state keys (``state_dict`` as safetensors, the rest
  in ``state.pt``). Nothing is written at ``path``: it is a *name*, recorded in the
  manifest's ``metadata["lightning"]["paths"]``. A second save at the same step under
  another name (``last.ckpt`` after the top-k file) is a new revision that carries both
  names; the older revision goes.
- Containers the weights-only loader cannot read back (``AttributeDict``,
  ``argparse.Namespace``, OmegaConf, ``pathlib`` paths, sets, ``torch.device``, classes
  like ``hparams_type``) are stored as plain dicts/lists/strings; each conversion is
  recorded (``metadata["lightning"]["converted"]``) and undone on load by building the
  same type from data (nothing is unpickled; classes only from a fixed allowlist). A
  dataclass is stored as its fields and comes back as a dict (its class is never
  imported). Code (functions, modules, enums, other objects) is refused with a
  ``ConfigError``.
- ``load_checkpoint(path)`` takes a checkpoint URL or name of the run, or a path
  Lightning saved (``best_model_path``, ``last.ckpt``), and returns the dict as it was
  saved. Reading is ckptkit's: sizes and hashes checked, weights-only decoding.
- ``remove_checkpoint(path)`` drops that name; a checkpoint goes when none of its names is
  left. The checkpoint this process loaded (resumed from) is never deleted: the removal
  is recorded in the run file ``lightning.json`` and done by a later process, after its
  first new commit.
- ``resume_path()`` is the newest valid checkpoint's URL for ``ckpt_path=`` (damaged
  newer ones skipped with a warning), None on a fresh run. Lightning's own
  ``ckpt_path="last"`` looks for files in ``ModelCheckpoint.dirpath`` and finds none.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import enum
import json
import os
import pathlib
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

from ckptkit.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    MissingDependencyError,
    install_hint,
)

try:
    from lightning.fabric.utilities.data import AttributeDict
    from lightning.pytorch.plugins.io import CheckpointIO
    from lightning.pytorch.utilities.rank_zero import rank_zero_only
except ImportError:  # pragma: no cover - exercised in a subprocess without lightning
    raise MissingDependencyError(
        "ckptkit.integrations.lightning needs lightning: " + install_hint("lightning", "lightning")
    ) from None

from ckptkit import run as runmod
from ckptkit.manager import CheckpointManager
from ckptkit.run import CheckpointInfo, log, warn

RUN_FILE = "lightning.json"  # names Lightning removed whose checkpoint had to stay
_LEAVES = (type(None), bool, int, float, str, bytes, torch.Tensor, torch.dtype, torch.Size)
_NUMPY_SCALARS = {
    *(f"int{b}" for b in (8, 16, 32, 64)),
    *(f"uint{b}" for b in (8, 16, 32, 64)),
    *(f"float{b}" for b in (16, 32, 64)),
    "bool_",
}


# -- plain data and back ------------------------------------------------------------
def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _omegaconf() -> Any:
    try:
        import omegaconf
    except ImportError:
        return None
    return omegaconf


# Classes a checkpoint may hold as values (Lightning's ``hparams_type``): rebuilt by name.
def _classes() -> dict[str, type]:
    out: dict[str, type] = {_name(c): c for c in (dict, AttributeDict, argparse.Namespace)}
    oc = _omegaconf()
    if oc is not None:
        out.update({_name(c): c for c in (oc.DictConfig, oc.ListConfig)})
    return out


def _rebuilders() -> dict[str, tuple[type | tuple[type, ...], Callable[[Any], Any]]]:
    """Type name -> (the plain value it must be, how to build the type from it)."""
    out: dict[str, tuple[type | tuple[type, ...], Callable[[Any], Any]]] = {
        _name(AttributeDict): (dict, AttributeDict),
        "argparse.Namespace": (dict, lambda v: argparse.Namespace(**v)),
        "types.SimpleNamespace": (dict, lambda v: types.SimpleNamespace(**v)),
        "builtins.set": (list, set),
        "builtins.frozenset": (list, frozenset),
        "torch.device": (str, torch.device),
        "builtins.type": (str, lambda v: _classes().get(v, v)),
        "numpy.ndarray": (torch.Tensor, lambda t: t.numpy()),
    }
    for cls in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"):
        out[f"pathlib.{cls}"] = (str, getattr(pathlib, cls))
    for name in _NUMPY_SCALARS:
        out[f"numpy.{name}"] = ((bool, int, float), getattr(np, name))
    oc = _omegaconf()
    if oc is not None:
        for cls in (oc.DictConfig, oc.ListConfig):
            out[_name(cls)] = ((dict, list), oc.OmegaConf.create)  # never from a YAML string
    return out


class _Plainer:
    """Turns a Lightning checkpoint dict into data the weights-only loader reads back,
    recording ``(where, type name)`` of each conversion."""

    def __init__(self) -> None:
        self.converted: list[dict[str, Any]] = []

    def convert(self, obj: Any, at: tuple[Any, ...]) -> Any:
        if isinstance(obj, enum.Enum):
            self._refuse(obj, at)
        # numpy first: np.float64 is a float
        if isinstance(obj, np.generic) and type(obj).__name__ in _NUMPY_SCALARS:
            return self._record(obj, at, obj.item(), kind=f"numpy.{type(obj).__name__}")
        if isinstance(obj, _LEAVES):
            return obj
        if isinstance(obj, np.ndarray) and obj.dtype.kind in "biuf":
            return self._record(obj, at, torch.from_numpy(obj.copy()), kind="numpy.ndarray")
        oc = _omegaconf()
        if oc is not None and isinstance(obj, oc.Container):
            # unresolved: "${lr}" stays an interpolation and comes back as one
            return self._record(obj, at, oc.OmegaConf.to_container(obj, resolve=False))
        if isinstance(obj, type):
            return self._record(obj, at, _name(obj), kind="builtins.type")
        if isinstance(obj, (argparse.Namespace, types.SimpleNamespace)):
            return self._record(obj, at, dict(vars(obj)))
        if isinstance(obj, Mapping):
            if type(obj) in (dict, collections.OrderedDict, collections.defaultdict):
                return {self._key(k, at): self.convert(v, (*at, k)) for k, v in obj.items()}
            return self._record(obj, at, dict(obj.items()))
        if isinstance(obj, (list, tuple)):
            if type(obj) in (list, tuple):
                return type(obj)(self.convert(v, (*at, i)) for i, v in enumerate(obj))
            return self._record(obj, at, (list if isinstance(obj, list) else tuple)(obj))
        if isinstance(obj, (set, frozenset)):
            return self._record(obj, at, sorted(obj, key=repr))
        if isinstance(obj, pathlib.PurePath):
            return self._record(obj, at, str(obj), kind=f"pathlib.{type(obj).__name__}")
        if isinstance(obj, torch.device):
            return self._record(obj, at, str(obj))
        if dataclasses.is_dataclass(obj):
            # Its fields, recorded with the class name; the class itself is never imported
            # on load, so it comes back as a dict.
            fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
            return self._record(obj, at, fields)
        self._refuse(obj, at)

    def _record(self, obj: Any, at: tuple[Any, ...], value: Any, kind: str | None = None) -> Any:
        plain = self.convert(value, at)
        # Paths of str/int keys only: JSON in the manifest. Under another key the value
        # simply stays plain.
        if all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in at):
            self.converted.append({"at": list(at), "type": kind or _name(type(obj))})
        return plain

    def _key(self, key: Any, at: tuple[Any, ...]) -> Any:
        if isinstance(key, enum.Enum) or not _plain_key(key):
            raise ConfigError(
                f"checkpoint{_where(at)} has a {type(key).__name__} key {key!r}: ckptkit "
                "stores dict keys that are numbers, strings or tuples of them; use a string key"
            )
        return key

    @staticmethod
    def _refuse(obj: Any, at: tuple[Any, ...]) -> None:
        raise ConfigError(
            f"checkpoint{_where(at)} is a {_name(type(obj))}: ckptkit stores data, not code or "
            "objects (never unpickled on load); keep it out of the hyper-parameters "
            "(save_hyperparameters(ignore=[...])) or store a plain value (its name, numbers)"
        )


def _plain_key(key: Any) -> bool:
    if type(key) is tuple:
        return all(_plain_key(k) for k in key)
    return type(key) in (str, int, float, bool, type(None))


def _where(at: Iterable[Any]) -> str:
    return "".join(f"[{k!r}]" for k in at)


def to_plain(checkpoint: Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``checkpoint`` as plain data, and the conversions to undo on load."""
    plainer = _Plainer()
    try:
        out = {k: plainer.convert(v, (k,)) for k, v in checkpoint.items()}
    except RecursionError:
        raise ConfigError(
            "the checkpoint holds a container that contains itself (or nests deeper than "
            "Python's recursion limit): store plain, finite data in the hyper-parameters"
        ) from None
    return out, plainer.converted


def from_plain(state: dict[str, Any], converted: list[dict[str, Any]]) -> dict[str, Any]:
    """Undo ``to_plain``'s conversions (deepest first, so that a parent is rebuilt from
    children that already are what they were)."""
    rebuild = _rebuilders()
    # The records come from the manifest: anything malformed is skipped, never trusted.
    entries = [e for e in converted if isinstance(e, dict) and isinstance(e.get("at"), list)]
    for entry in sorted(entries, key=lambda e: -len(e["at"])):
        at, spec = entry["at"], rebuild.get(str(entry.get("type")))
        if spec is None or not at:
            continue  # a type we do not rebuild (a dict subclass, a namedtuple): stays plain
        parent: Any = state
        with contextlib.suppress(KeyError, IndexError, TypeError):
            for key in at[:-1]:
                parent = parent[key]
            accepts, build = spec
            value = parent[at[-1]]
            if not isinstance(parent, (dict, list)) or not isinstance(value, accepts):
                continue
            try:
                parent[at[-1]] = build(value)
            except Exception:  # noqa: BLE001 - e.g. OmegaConf refusing a key: stays plain
                continue
    return state


def _metrics(checkpoint: Mapping[str, Any]) -> dict[str, float]:
    """What ModelCheckpoint callbacks monitor, at this save (``ckptkit ls`` shows it)."""
    out: dict[str, float] = {}
    callbacks = checkpoint.get("callbacks")
    for value in (callbacks or {}).values() if isinstance(callbacks, Mapping) else ():
        if not isinstance(value, Mapping) or not isinstance(value.get("monitor"), str):
            continue
        score = value.get("current_score")
        if isinstance(score, torch.Tensor) and score.numel() == 1:
            score = score.item()
        if isinstance(score, (int, float)) and np.isfinite(score):
            out[value["monitor"]] = float(score)
    return out


def _move(value: Any, map_location: Any) -> Any:
    if map_location is None or callable(map_location):
        return value  # ckptkit decodes on the CPU; Lightning moves the state itself
    if isinstance(value, torch.Tensor):
        if isinstance(map_location, Mapping):
            target = map_location.get(str(value.device), str(value.device))
            return value.to(target)
        return value.to(map_location)
    if isinstance(value, dict):
        for k, v in value.items():
            value[k] = _move(v, map_location)
    elif isinstance(value, list):
        value[:] = [_move(v, map_location) for v in value]
    return value


# -- the CheckpointIO ---------------------------------------------------------------
def _meta(info: CheckpointInfo) -> dict[str, Any]:
    meta = info.manifest.metadata.get("lightning")
    return meta if isinstance(meta, dict) else {}


def _paths(info: CheckpointInfo) -> list[str]:
    paths = _meta(info).get("paths")
    return [p for p in paths if isinstance(p, str)] if isinstance(paths, list) else []


class CkptkitCheckpointIO(CheckpointIO):
    """Lightning's checkpoint files as checkpoints of the ckptkit run at ``url`` (module
    docstring). Retention is Lightning's (``ModelCheckpoint(save_top_k=...)``)."""

    def __init__(self, url: str, *, verify: bool = True) -> None:
        super().__init__()
        self.url = url
        self.verify = verify
        self.resumed_from: str | None = None  # checkpoint name: never deleted by this process
        self._mgr: CheckpointManager | None = None
        self._removed: dict[str, set[str]] | None = None
        self._recorded: dict[str, set[str]] = {}  # what RUN_FILE holds

    # -- the run ------------------------------------------------------------------
    @property
    def manager(self) -> CheckpointManager:
        """The run's writer (holds the run lock until ``teardown``)."""
        if self._mgr is None:
            self._mgr = CheckpointManager(
                self.url,
                keep_last=None,
                keep_best=0,
                save_on_epoch_end=False,
                verify=self.verify,
                # Lightning's DDP launcher re-runs the script in every rank's process before
                # torch.distributed is up: its rank (from RANK/LOCAL_RANK/...) says who
                # writes. Lightning saves and removes on rank 0 only.
                readonly=rank_zero_only.rank != 0,
            )
            self._removed = self._read_removed(self._mgr)
            self._recorded = {n: set(ps) for n, ps in self._removed.items()}
            self._protect()
        return self._mgr

    def teardown(self) -> None:
        """Flush pending uploads and release the run lock (Lightning calls it after fit)."""
        if self._mgr is not None:
            self._mgr.close()
            self._mgr = None

    def _protect(self) -> None:
        mgr = self._mgr
        if mgr is not None and self.resumed_from is not None:
            mgr.restored_from = next((c for c in mgr.list() if c.name == self.resumed_from), None)

    @staticmethod
    def _read_removed(mgr: CheckpointManager) -> dict[str, set[str]]:
        raw = mgr.read_file(RUN_FILE)
        try:
            removed = json.loads(raw)["removed"] if raw else {}
        except (ValueError, KeyError, TypeError):
            return {}  # damaged: forgetting a removal keeps a checkpoint, never loses one
        if not isinstance(removed, dict):
            return {}
        return {
            n: {p for p in ps if isinstance(p, str)}
            for n, ps in removed.items()
            if isinstance(ps, list)
        }

    def _live(self, checkpoints: list[CheckpointInfo]) -> dict[str, CheckpointInfo]:
        """Lightning path -> the checkpoint holding it: the newest saved carrying it,
        unless Lightning removed it since."""
        holder: dict[str, CheckpointInfo] = {}
        for info in sorted(checkpoints, key=lambda c: (c.manifest.created, c.step, c.revision)):
            for path in _paths(info):
                holder[path] = info
        removed = self._removed or {}
        return {p: c for p, c in holder.items() if p not in removed.get(c.name, set())}

    def _collect(self, checkpoints: list[CheckpointInfo]) -> None:
        """Delete every Lightning checkpoint none of whose names is live, except the one
        resumed from; keep the run file's records of the rest."""
        mgr, removed = self.manager, self._removed if self._removed is not None else {}
        held = {c.name for c in self._live(checkpoints).values()}
        existing: set[str] = set()
        for info in checkpoints:
            if not _paths(info) or info.name in held:
                existing.add(info.name)
            elif info.name == self.resumed_from:
                existing.add(info.name)
                log.info("keeping %s, the checkpoint this run resumed from", info.name)
            else:
                try:
                    mgr.delete(info)
                except OSError as exc:  # StorageError included: the save itself stands
                    existing.add(info.name)
                    warn(f"could not delete {info.name}, which Lightning removed ({exc})")
        kept = {n: ps for n, ps in removed.items() if n in existing and ps}
        self._removed = kept
        if kept != self._recorded:
            data = {"removed": {n: sorted(ps) for n, ps in sorted(kept.items())}}
            mgr.write_file(RUN_FILE, json.dumps(data, indent=1))
            self._recorded = {n: set(ps) for n, ps in kept.items()}

    def _find(self, path: str, checkpoints: list[CheckpointInfo]) -> tuple[str, CheckpointInfo]:
        """The checkpoint ``path`` names (its URL or name in the run, or a Lightning path
        saved here) and the name that matched."""
        for info in checkpoints:
            if path in (info.name, info.url) or _same_local(path, info.url):
                return path, info
        live = self._live(checkpoints)
        if path in live:
            return path, live[path]
        base = os.path.basename(path)
        hits = [p for p in live if os.path.basename(p) == base]
        if len({live[p].name for p in hits}) == 1:
            return hits[0], live[hits[0]]
        raise CheckpointNotFoundError(
            f"{path}: no checkpoint of {self.url} has this name or Lightning path; pass "
            "ckpt_path=io.resume_path() (the newest valid one) or a checkpoint URL of the run"
        )

    # -- CheckpointIO -------------------------------------------------------------
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise ConfigError(
                "storage_options is not used by CkptkitCheckpointIO: the run URL's storage "
                "decides; pass storage_options=None"
            )
        if self.manager.readonly:
            return  # not rank 0: Lightning calls this on rank 0 only, but a direct call may
        path = os.fspath(path)
        step = checkpoint.get("global_step", 0)
        if not isinstance(step, int) or isinstance(step, bool):
            raise ConfigError(f"checkpoint['global_step'] must be an int, got {step!r}")
        state, converted = to_plain(checkpoint)
        mgr = self.manager
        checkpoints = mgr.list()
        # The same step saved before under other names: this revision replaces it (the
        # manager deletes the older one), so it carries those names too.
        same = [c for c in checkpoints if c.step == step]
        names = [path]
        if same:
            names += [p for p, c in self._live(checkpoints).items() if c.name == same[-1].name]
        epoch = checkpoint.get("epoch")
        mgr.metadata["lightning"] = {
            "path": path,
            "paths": list(dict.fromkeys(names)),
            "keys": list(state),
            "converted": converted,
        }
        try:
            info = mgr.save(
                step, state, _metrics(checkpoint), epoch=epoch if isinstance(epoch, int) else None
            )
        finally:
            mgr.metadata.pop("lightning", None)
        mgr.wait()  # durable (Drive uploads done) before training goes on
        if info is not None:
            self._collect(mgr.list())

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # weights_only is always in effect: ckptkit decodes data, never code.
        mgr = self.manager
        _, info = self._find(os.fspath(path), mgr.list())
        state = runmod.read_state(mgr.storage, info, verify=True)
        meta = _meta(info)
        keys = meta.get("keys")
        if isinstance(keys, list):  # only Lightning's keys, not a plugin's extra state
            state = {k: state[k] for k in keys if k in state}
        converted = meta.get("converted")
        state = from_plain(state, converted if isinstance(converted, list) else [])
        self.resumed_from = info.name
        self._protect()
        return _move(state, map_location)

    def remove_checkpoint(self, path: Any) -> None:
        mgr = self.manager
        if mgr.readonly:
            return
        checkpoints = mgr.list()
        try:
            name, info = self._find(os.fspath(path), checkpoints)
        except CheckpointNotFoundError:
            return  # not one of ours (or removed already): nothing to do
        removed = self._removed if self._removed is not None else {}
        gone = removed.setdefault(info.name, set())
        # By its ckptkit name or URL every Lightning name of it goes, else that one name.
        gone.update(_paths(info) if name in (info.name, info.url) else [name])
        self._removed = removed
        self._collect(checkpoints)

    # -- resume -------------------------------------------------------------------
    def resume_path(self) -> str | None:
        """The newest valid checkpoint's URL for ``trainer.fit(ckpt_path=...)``; None when
        the run has none. Raises CorruptCheckpointError when every one is damaged."""
        return _newest(self.manager)


def _same_local(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return False
    return os.path.realpath(a) == os.path.realpath(b)


def latest_ckpt_path(url: str) -> str | None:
    """The newest valid checkpoint of the run at ``url`` as a ``ckpt_path`` for a Trainer
    using ``CkptkitCheckpointIO(url)``; None on a fresh run. Takes no run lock."""
    return _newest(CheckpointManager(url, readonly=True))


def _newest(mgr: CheckpointManager) -> str | None:
    latest = mgr.latest()
    if latest is None and mgr.list():
        raise CorruptCheckpointError(
            f"{mgr.url}: every checkpoint is damaged, so there is nothing to resume from: "
            "check them with `ckptkit verify`, or use another run URL to start over"
        )
    return None if latest is None else latest.url
