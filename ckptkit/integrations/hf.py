"""Hugging Face ``Trainer`` checkpoints committed into a ckptkit run.

    from ckptkit.integrations.hf import CkptkitCallback
    cb = CkptkitCallback("gs://bucket/run1", keep_last=3, keep_best=1)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train(resume_from_checkpoint=cb.resume_dir(args.output_dir))

What a caller may rely on:

- ``on_save`` reads the ``checkpoint-<N>/`` the Trainer has just written through
  ckptkit's Trainer reader (completeness rule and safe loading, ckptkit/formats/hf.py)
  and commits it as a native ckptkit checkpoint (manifest last, verified on read):
  ``model`` (the weight tensors), ``optimizer``, ``scheduler`` (their state dicts),
  ``rng`` (the Trainer's RNG state as ``ckptkit.RNGState`` holds it) and
  ``hf_files``, the other files of the directory (``config.json``, ``trainer_state.json``,
  ``rng_state.pth``, ``training_args.bin``...) byte for byte as uint8 tensors, so that
  the directory can be rebuilt exactly. ``ckptkit ls/verify/inspect`` and
  ``ckptkit.load`` treat it like any other checkpoint.
- Retention is ckptkit's: the last ``keep_last``, the ``keep_best`` best by the Trainer's
  ``metric_for_best_model`` (``greater_is_better`` gives the mode), never the checkpoint
  resumed from. The Trainer's ``save_total_limit`` only prunes its local ``output_dir``:
  the run keeps its own, so a small ``save_total_limit`` (even 1) saves local disk without
  losing anything the run keeps.
- ``resume_dir(output_dir)`` first commits the newest *complete* local ``checkpoint-<N>``
  newer than the run's latest (the Trainer wrote it, the job died before the commit);
  incomplete ones are ignored. It then rebuilds the run's newest valid checkpoint as a
  local ``checkpoint-<N>/`` under ``output_dir/ckptkit-resume/`` (written under a temporary
  name and renamed, so a kill never leaves a partial one there) and returns its path, or
  None when the run has no checkpoint (a fresh run). That directory is what
  ``Trainer.train(resume_from_checkpoint=...)`` and ``from_pretrained`` read.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

import torch

from ckptkit.errors import ConfigError, CorruptCheckpointError, MissingDependencyError, install_hint

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - exercised in a subprocess without transformers
    raise MissingDependencyError(
        "ckptkit.integrations.hf needs transformers: " + install_hint("hf", "transformers")
    ) from None

from ckptkit import run as runmod
from ckptkit.formats.hf import CHECKPOINT_DIR, read_hf_checkpoint
from ckptkit.manager import CheckpointManager
from ckptkit.run import CheckpointInfo, warn
from ckptkit.storage.registry import open_storage

RESUME_FOLDER = "ckptkit-resume"
# Files rebuilt from decoded state rather than copied: the weights (any layout, sharded
# or not, become one safetensors file), the optimizer and the scheduler.
_DECODED = re.compile(
    r"^(model|pytorch_model|adapter_model)([-.].*)?\.(safetensors|bin)(\.index\.json)?$"
    r"|^optimizer\.(pt|bin)$|^scheduler\.pt$"
)


_REBUILT = re.compile(r"^checkpoint-\d+(\.tmp-\d+)?$")


def _metric_key(name: str | None) -> str | None:
    # The Trainer prefixes the metric it ranks by with "eval_" (trainer._determine_best_metric).
    if not name:
        return None
    return name if name.startswith("eval_") else f"eval_{name}"


def _as_bytes_tensor(data: bytes) -> torch.Tensor:
    return (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.empty(0, dtype=torch.uint8)
    )


def _hf_state(directory: str) -> tuple[dict[str, Any], int, int | None, dict[str, float]]:
    """A complete ``checkpoint-<N>/`` as the state ckptkit commits: (state, step, epoch,
    metrics). Raises CorruptCheckpointError when the Trainer's completeness rule fails."""
    loaded = read_hf_checkpoint(open_storage(directory))
    if loaded.step is None or "model" not in loaded.state:
        raise CorruptCheckpointError(f"{directory}: not a Trainer checkpoint-N directory")
    weights = (
        "adapter_model.safetensors"
        if any(n.startswith("adapter_model") for n in os.listdir(directory))
        else "model.safetensors"
    )
    files: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if _DECODED.match(name):
            continue
        if not os.path.isfile(path) or os.path.islink(path):
            raise ConfigError(
                f"{path}: sub-folders and links in a Trainer checkpoint are not supported "
                "(FSDP sharded or DeepSpeed state): save with FULL_STATE_DICT"
            )
        with open(path, "rb") as f:
            files[name] = _as_bytes_tensor(f.read())
    state: dict[str, Any] = {"model": loaded.state["model"], "hf_weights": weights}
    # rng: the Trainer's RNG in ckptkit.RNGState's layout, so inspect/load show it; the
    # directory is rebuilt from the verbatim rng_state*.pth in hf_files.
    for key in ("optimizer", "scheduler", "rng"):
        if key in loaded.state:
            state[key] = loaded.state[key]
    state["hf_files"] = files
    return state, loaded.step, loaded.epoch, loaded.metrics


def _write_dir(state: dict[str, Any], target: str) -> None:
    """Rebuild a ``checkpoint-<N>/`` from a committed state, under a temporary name first."""
    from safetensors.torch import save_file

    tmp = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model = {k: v.contiguous() for k, v in state["model"].items()}
    save_file(
        model,
        os.path.join(tmp, str(state.get("hf_weights", "model.safetensors"))),
        metadata={"format": "pt"},
    )
    for key, fname in (("optimizer", "optimizer.pt"), ("scheduler", "scheduler.pt")):
        if key in state:
            torch.save(state[key], os.path.join(tmp, fname))
    for name, data in (state.get("hf_files") or {}).items():
        # plain names only, and never one that would replace the rebuilt weights/optimizer
        if os.path.basename(name) != name or name in ("", ".", "..") or _DECODED.match(name):
            raise CorruptCheckpointError(f"bad file name {name!r} in hf_files")
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data.numpy().tobytes())
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _local_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """``checkpoint-<N>`` directories in ``output_dir``, newest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [
        (int(m.group(1)), os.path.join(output_dir, n))
        for n in os.listdir(output_dir)
        if (m := CHECKPOINT_DIR.match(n)) and os.path.isdir(os.path.join(output_dir, n))
    ]
    return sorted(found, reverse=True)


class CkptkitCallback(TrainerCallback):
    """Commits every checkpoint the Trainer writes into the ckptkit run at ``url``
    (module docstring). ``metric``/``greater_is_better`` default to the Trainer's
    ``metric_for_best_model``/``greater_is_better``."""

    def __init__(
        self,
        url: str,
        *,
        keep_last: int | None = 3,
        keep_best: int = 1,
        metric: str | None = None,
        greater_is_better: bool | None = None,
    ) -> None:
        self.url = url
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.metric = metric
        self.greater_is_better = greater_is_better
        self.resumed_from: str | None = None  # checkpoint name; retention never deletes it
        self._mgr: CheckpointManager | None = None

    # -- the manager ----------------------------------------------------------
    def _manager(self) -> CheckpointManager:
        if self._mgr is None:
            key = _metric_key(self.metric)
            mode = "max" if self.greater_is_better else "min"
            self._mgr = CheckpointManager(
                self.url,
                keep_last=self.keep_last,
                keep_best=self.keep_best if key else 0,
                best_metric=key,
                mode=mode,
                save_on_epoch_end=False,
                distributed=False,  # the Trainer's main process alone commits
            )
            if self.resumed_from is not None:
                self._mgr.restored_from = next(
                    (c for c in self._mgr.list() if c.name == self.resumed_from), None
                )
        return self._mgr

    def close(self) -> None:
        """Flush pending uploads and release the run lock."""
        if self._mgr is not None:
            self._mgr.close()
            self._mgr = None

    def commit_dir(self, directory: str) -> CheckpointInfo | None:
        """Commit one complete ``checkpoint-<N>/``; CorruptCheckpointError when incomplete."""
        state, step, epoch, metrics = _hf_state(directory)
        return self._manager().save(step, state, metrics, epoch=epoch)

    # -- resume ---------------------------------------------------------------
    def resume_dir(self, output_dir: str, local_dir: str | None = None) -> str | None:
        """The run's newest valid checkpoint as a local ``checkpoint-<N>/`` path, after
        committing a newer complete local one; None on a fresh run."""
        mgr = self._manager()
        latest = mgr.latest()
        for step, path in _local_checkpoints(output_dir):
            if latest is not None and step <= latest.step:
                break
            try:
                _hf_state(path)
            except CorruptCheckpointError as exc:
                warn(f"ignoring the incomplete local {path} ({exc})")
                continue
            self.commit_dir(path)
            latest = mgr.latest()
            break
        if latest is None:
            return None
        restored = runmod.read_state(mgr.storage, latest, verify=True)  # sha256 + decode
        folder = local_dir or os.path.join(output_dir, RESUME_FOLDER)
        target = os.path.join(folder, f"checkpoint-{latest.step}")
        os.makedirs(folder, exist_ok=True)
        if local_dir is None:  # our own folder: earlier rebuilds and a killed one's leftovers go
            for name in os.listdir(folder):
                if _REBUILT.match(name) and name != os.path.basename(target):
                    shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
        _write_dir(restored, target)
        self.resumed_from = latest.name
        mgr.restored_from = latest
        return target

    # -- Trainer events -------------------------------------------------------
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.metric is None:
            self.metric = getattr(args, "metric_for_best_model", None)
        if self.greater_is_better is None:
            self.greater_is_better = bool(getattr(args, "greater_is_better", False))
        if self._mgr is not None and self._mgr.best_metric != _metric_key(self.metric):
            self.close()  # opened by an early resume_dir: reopen it ranking by the metric

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        self.commit_dir(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        self._manager().wait()  # durable (Drive uploads done) before training goes on

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()


def latest_checkpoint_dir(url: str, output_dir: str, local_dir: str | None = None) -> str | None:
    """``CkptkitCallback(url).resume_dir(output_dir, local_dir)`` for a one-off call; the
    run lock is released before it returns."""
    cb = CkptkitCallback(url)
    try:
        return cb.resume_dir(output_dir, local_dir)
    finally:
        cb.close()
