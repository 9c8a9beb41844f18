"""Checkpoints of a model's trainable part only (LoRA/PEFT adapters, a head over a frozen
backbone), with a fingerprint of the frozen part that a resume must match."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ckptkit.errors import ConfigError, IncompatibleCheckpointError

FORMAT = "ckptkit.trainable_only/1"
_SHOW = 4  # names listed in a one-line error


class TrainableOnly:
    """A stateful view over ``model`` for a ckptkit ``state`` dict, in place of the model.

    ``state_dict()`` holds every parameter with ``requires_grad=True`` and every persistent
    buffer (BatchNorm statistics and the like: whether a buffer changes cannot be known in
    general, and buffers are small), under the model's ``state_dict`` names, plus a
    fingerprint of the frozen parameters: a sha256 per parameter over its name, shape, dtype
    and bytes, and one over all of them. Restoring refuses, before anything is written, a
    checkpoint whose trainable names or shapes differ, or whose frozen weights differ from
    this model's (naming them); ``check_frozen=False`` skips the frozen check only.

    Hashing the frozen weights reads them all once (at the first save or check); later saves
    hash again only a frozen tensor that was replaced or changed in place (its storage or
    version counter moved). Writes through ``.data`` are invisible to that counter.

    ``load_state_dict`` also takes a flat ``{name: tensor}`` dict of the trainable tensors
    (what Time-LLM's ``TrainableState`` wrote): it has no fingerprint, so only names and
    shapes are checked.
    """

    def __init__(self, model: nn.Module, *, check_frozen: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"TrainableOnly wraps a torch.nn.Module, got a {type(model).__name__}"
            )
        self.model = model
        self.check_frozen = check_frozen
        self._cache: dict[str, tuple[tuple[Any, ...], str]] = {}

    # -- what is saved ------------------------------------------------------------------

    def trainable_tensors(self) -> dict[str, Tensor]:
        """``{name: tensor}`` of what is saved: live tensors, not copies."""
        out = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        out.update(_persistent_buffers(self.model))
        return out

    def frozen_fingerprint(self) -> dict[str, Any]:
        """``{"digest": sha256 hex, "params": {name: sha256 hex}}`` of the frozen parameters."""
        params: dict[str, str] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                continue
            key = (p.data_ptr(), p._version, tuple(p.shape), p.dtype, p.device)
            hit = self._cache.get(name)
            if hit is None or hit[0] != key:
                hit = (key, _tensor_digest(p))
                self._cache[name] = hit
            params[name] = hit[1]
        total = hashlib.sha256()
        for name in sorted(params):
            total.update(f"{name}\0{params[name]}\n".encode())
        return {"digest": total.hexdigest(), "params": params}

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "tensors": {n: t.detach() for n, t in self.trainable_tensors().items()},
            "frozen": self.frozen_fingerprint(),
        }

    # -- restore ------------------------------------------------------------------------

    def check_state_dict(self, state: Any) -> None:
        """Raise :class:`IncompatibleCheckpointError` unless ``load_state_dict(state)`` would
        take it; changes nothing."""
        tensors, frozen = _parts(state)
        own = self.trainable_tensors()
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise IncompatibleCheckpointError(
                f"trainable tensors differ from the checkpoint's: missing {_few(missing)}, "
                f"unexpected {_few(unexpected)}; set requires_grad on the same parameters "
                "as the run that saved it"
            )
        bad = [
            f"{k} {_shape(v)} vs {tuple(own[k].shape)}"
            for k, v in tensors.items()
            if not (isinstance(v, Tensor) and v.shape == own[k].shape)
        ]
        if bad:
            raise IncompatibleCheckpointError(
                f"trainable tensor shapes differ: {'; '.join(bad[:_SHOW])} "
                "(checkpoint vs model); build the model with the same sizes"
            )
        if frozen is not None and self.check_frozen:
            self._check_frozen(frozen)

    def _check_frozen(self, frozen: Any) -> None:
        theirs = frozen.get("params") if isinstance(frozen, Mapping) else None
        if not isinstance(theirs, Mapping):
            raise IncompatibleCheckpointError(
                "the checkpoint's frozen fingerprint is unreadable; "
                "pass TrainableOnly(model, check_frozen=False) to load it anyway"
            )
        mine = self.frozen_fingerprint()
        if mine["digest"] == frozen.get("digest"):
            return
        ours = mine["params"]
        differ = sorted(k for k in ours if k in theirs and ours[k] != theirs[k])
        gone = sorted(set(theirs) - set(ours))
        new = sorted(set(ours) - set(theirs))
        what = [
            f"{label} {_few(names)}"
            for label, names in (
                ("changed:", differ),
                ("frozen in the checkpoint only:", gone),
                ("frozen here only:", new),
            )
            if names
        ] or ["fingerprint digest differs"]
        raise IncompatibleCheckpointError(
            f"frozen weights differ from those the checkpoint was trained on ({'; '.join(what)}); "
            "load the same base weights, or pass TrainableOnly(model, check_frozen=False) "
            "to load anyway"
        )

    def load_state_dict(self, state: Any) -> None:
        self.check_state_dict(state)
        tensors, _ = _parts(state)
        own = self.trainable_tensors()
        with torch.no_grad():
            for name, value in tensors.items():
                own[name].copy_(value)


def _parts(state: Any) -> tuple[Mapping[str, Any], Any]:
    """``(tensors, frozen fingerprint or None)`` of our layout or the flat legacy one."""
    if isinstance(state, Mapping) and state.get("format") == FORMAT:
        tensors = state.get("tensors")
        if isinstance(tensors, Mapping):
            return tensors, state.get("frozen")
    elif isinstance(state, Mapping) and all(isinstance(v, Tensor) for v in state.values()):
        return state, None  # a flat {name: tensor} dict: Time-LLM's TrainableState
    raise IncompatibleCheckpointError(
        f"this state is a {type(state).__name__} that TrainableOnly did not write; "
        "restore a checkpoint saved with TrainableOnly(model)"
    )


def _persistent_buffers(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    for prefix, module in model.named_modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                yield (f"{prefix}.{name}" if prefix else name), buf


def _tensor_digest(t: Tensor) -> str:
    """sha256 over a tensor's shape, dtype and bytes (on CPU; bfloat16 and friends as raw
    bytes, which numpy cannot represent otherwise)."""
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    flat = t.detach().reshape(-1).contiguous().cpu()
    if flat.numel():
        h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h.hexdigest()


def _shape(value: Any) -> Any:
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__


def _few(names: list[str]) -> str:
    more = f" and {len(names) - _SHOW} more" if len(names) > _SHOW else ""
    return (", ".join(names[:_SHOW]) or "none") + more
