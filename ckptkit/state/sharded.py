"""A model (and its optimizer) whose state may be sharded across ranks: FSDP2
``fully_shard``, DTensor, or a plain module. Saved through ``torch.distributed.checkpoint``
into the checkpoint's ``dcp/`` folder; restores at any world size."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ckptkit.errors import IncompatibleCheckpointError


class ShardedState:
    """``state={"app": ShardedState(model, optimizer), "rng": RNGState(), ...}``.

    ``state_dict()`` is DCP's ``get_state_dict(model, optimizer)``: the model's and the
    optimizer's state keyed by parameter name, each rank holding its own shards (DTensors
    under FSDP2). ``CheckpointManager.save`` writes it through ``dcp.save`` on every rank.

    ``load_state_dict(saved)`` takes the full tensors a checkpoint holds (whatever world
    size wrote it) and gives them to DCP's ``set_state_dict(..., full_state_dict=True)``,
    which keeps this rank's shard of each: a save at 2 ranks restores at 1 and the other
    way round. Call it on every rank (set_state_dict is collective under FSDP2).
    """

    ckptkit_layout = "dcp"  # the manager writes this key through DCP (formats/sharded.py)

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"ShardedState takes a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.optimizer = optimizer

    def _optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        return () if self.optimizer is None else (self.optimizer,)

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self._optimizers())
        out: dict[str, Any] = {"model": model_sd}
        if self.optimizer is not None:
            out["optimizer"] = optim_sd
        return out

    def check_state_dict(self, saved: Any) -> None:
        """Raise IncompatibleCheckpointError unless ``saved`` fits this model (names and
        full shapes) and optimizer; changes nothing."""
        if not isinstance(saved, Mapping) or not isinstance(saved.get("model"), Mapping):
            raise IncompatibleCheckpointError(
                "sharded state holds no 'model' dict; it was not written by ShardedState"
            )
        if self.optimizer is not None and not isinstance(saved.get("optimizer"), Mapping):
            raise IncompatibleCheckpointError(
                "sharded state holds no optimizer state: pass ShardedState(model) without an "
                "optimizer, or restore a checkpoint saved with one"
            )
        here = {k: _full_shape(v) for k, v in self.model.state_dict().items()}
        there = saved["model"]
        for name in sorted(set(here) ^ set(there))[:1]:
            side = "this model lacks" if name in there else "the checkpoint lacks"
            raise IncompatibleCheckpointError(
                f"sharded state: {side} {name!r}; restore into the model that was saved"
            )
        for name, shape in here.items():
            value = there[name]
            if isinstance(value, torch.Tensor) and shape is not None and value.shape != shape:
                raise IncompatibleCheckpointError(
                    f"sharded state: {name!r} has shape {list(value.shape)} in the checkpoint "
                    f"but {list(shape)} in this model; restore into the model that was saved"
                )

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        self.check_state_dict(saved)
        kinds = _tuples(self.optimizer)
        set_state_dict(
            self.model,
            self._optimizers(),
            model_state_dict=dict(saved["model"]),
            optim_state_dict=dict(saved.get("optimizer") or {}),
            options=StateDictOptions(full_state_dict=True, strict=True),
        )
        _restore_tuples(self.optimizer, kinds)


def _tuples(optimizer: torch.optim.Optimizer | None) -> list[set[str]]:
    return [{k for k, v in g.items() if isinstance(v, tuple)} for g in (optimizer.param_groups if optimizer else [])]  # fmt: skip


def _restore_tuples(optimizer: torch.optim.Optimizer | None, kinds: list[set[str]]) -> None:
    """Hyper-parameters that were tuples (AdamW's ``betas``) are tuples again: DCP's
    ``set_state_dict`` hands them back as lists."""
    for group, keys in zip(optimizer.param_groups if optimizer else [], kinds, strict=False):
        for key in keys:
            if isinstance(group.get(key), list):
                group[key] = tuple(group[key])


def _full_shape(value: Any) -> torch.Size | None:
    # A DTensor's .shape is its global shape: what the checkpoint holds, assembled.
    return value.shape if isinstance(value, torch.Tensor) else None
