"""Capture and restore every random number generator a training run draws from."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ckptkit.errors import IncompatibleCheckpointError
from ckptkit.run import warn

Generator = np.random.Generator | torch.Generator

# What restoring a damaged part into a generator raises.
_BAD_STATE = (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError)
# Marks a NumPy array inside an encoded bit-generator state, so decoding can tell it
# apart from the plain dicts that the state is made of.
_NDARRAY = "__ndarray__"


class RNGState:
    """The state of Python's `random`, NumPy's global RNG, torch's CPU and CUDA RNGs, and
    of any extra NumPy / torch generators passed in.

    `state_dict()` snapshots them all at call time; `load_state_dict()` puts them back so
    every later draw repeats exactly. The state holds only tensors and plain Python values,
    so it loads with `torch.load(..., weights_only=True)`. Extra generators are matched by
    position, so pass the same kinds in the same order when resuming.
    """

    # Under torch.distributed the manager saves every rank's RNG state and gives each
    # rank its own back (docs/INTEGRATIONS.md, "torchrun / DDP / FSDP").
    ckptkit_per_rank = True

    def __init__(self, generators: Sequence[Generator] = ()) -> None:
        for gen in generators:
            if not isinstance(gen, np.random.Generator | torch.Generator):
                raise TypeError(
                    f"RNGState takes numpy.random.Generator or torch.Generator, got {type(gen).__name__}"
                )
        self.generators: tuple[Generator, ...] = tuple(generators)

    def state_dict(self) -> dict[str, Any]:
        return {
            "python": _python_state(),
            "numpy": _numpy_global_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "generators": [_generator_state(gen) for gen in self.generators],
        }

    def check_state_dict(self, state: Any) -> None:
        """Raise IncompatibleCheckpointError unless `load_state_dict(state)` would restore
        every generator; changes nothing. Each part is loaded into a throwaway generator
        of the same kind, so a damaged part is found before any real RNG is touched."""
        fix = "it was not written by RNGState.state_dict()"
        if not isinstance(state, Mapping):
            raise IncompatibleCheckpointError(f"RNG state is a {type(state).__name__}; {fix}")
        missing = {"python", "numpy", "torch", "cuda", "generators"} - state.keys()
        if missing:
            raise IncompatibleCheckpointError(f"RNG state lacks {sorted(missing)}; {fix}")
        saved_generators = state["generators"]
        if not isinstance(saved_generators, list | tuple):
            raise IncompatibleCheckpointError(f"RNG state's generators is not a list; {fix}")
        if len(saved_generators) != len(self.generators):
            raise IncompatibleCheckpointError(
                f"checkpoint has {len(saved_generators)} extra generators but RNGState was given "
                f"{len(self.generators)}; pass the same generators, in the same order, as when saving"
            )
        parts: list[tuple[str, Any]] = [
            ("python", lambda: random.Random().setstate(_to_python_state(state["python"]))),
            (
                "numpy",
                lambda: np.random.RandomState().set_state(_to_numpy_global_state(state["numpy"])),
            ),
            ("torch", lambda: torch.Generator().set_state(state["torch"])),
            ("cuda", lambda: _check_cuda(state["cuda"])),
        ]
        for i, (gen, saved) in enumerate(zip(self.generators, saved_generators, strict=True)):
            parts.append((f"extra generator {i}", _generator_check(i, gen, saved)))
        for part, check in parts:
            try:
                check()
            except IncompatibleCheckpointError:
                raise
            except _BAD_STATE as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise IncompatibleCheckpointError(
                    f"RNG state: the {part} part does not load ({first}); {fix}"
                ) from exc

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore every generator. Raises IncompatibleCheckpointError when the extra
        generators differ in number or kind, or a part is damaged; warns and restores what
        it can when the checkpoint's CUDA devices are missing here."""
        # Check every part before touching any, so a refusal leaves all RNGs as they were.
        self.check_state_dict(state)
        saved_generators = state["generators"]

        random.setstate(_to_python_state(state["python"]))
        np.random.set_state(_to_numpy_global_state(state["numpy"]))
        torch.set_rng_state(state["torch"])
        _restore_cuda(state["cuda"])
        for gen, saved in zip(self.generators, saved_generators, strict=True):
            _restore_generator(gen, saved)


def _python_state() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    return {
        "version": version,
        "internal": torch.tensor(internal, dtype=torch.int64),
        "gauss_next": gauss_next,
    }


def _to_python_state(state: dict[str, Any]) -> tuple[Any, ...]:
    return (state["version"], tuple(state["internal"].tolist()), state["gauss_next"])


def _numpy_global_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "bit_generator": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _to_numpy_global_state(state: dict[str, Any]) -> tuple[Any, ...]:
    keys = state["keys"].numpy().astype(np.uint32)
    return (
        state["bit_generator"],
        keys,
        state["pos"],
        state["has_gauss"],
        state["cached_gaussian"],
    )


def _restore_cuda(saved: list[torch.Tensor]) -> None:
    if not saved:
        return
    if not torch.cuda.is_available():
        warn(
            f"checkpoint holds RNG state for {len(saved)} CUDA device(s) but CUDA is not "
            "available here; CUDA RNG state not restored"
        )
        return
    count = torch.cuda.device_count()
    if count != len(saved):
        warn(
            f"checkpoint holds RNG state for {len(saved)} CUDA device(s) but {count} are "
            f"visible; restoring devices 0..{min(count, len(saved)) - 1} only"
        )
    for device, device_state in enumerate(saved[:count]):
        torch.cuda.set_rng_state(device_state, device)


def _generator_state(gen: Generator) -> dict[str, Any]:
    if isinstance(gen, torch.Generator):
        return {"kind": "torch", "device": str(gen.device), "state": gen.get_state()}
    return {"kind": "numpy", "state": _encode(gen.bit_generator.state)}


def _check_generator(i: int, gen: Generator, saved: dict[str, Any]) -> None:
    kind = "torch" if isinstance(gen, torch.Generator) else "numpy"
    if saved["kind"] != kind:
        raise IncompatibleCheckpointError(
            f"extra generator {i} was a {saved['kind']} generator when saved but is a {kind} "
            "one now; pass the same generators, in the same order, as when saving"
        )
    if kind == "numpy":
        saved_name = saved["state"]["bit_generator"]
        name = type(gen.bit_generator).__name__
        if saved_name != name:
            raise IncompatibleCheckpointError(
                f"extra generator {i} used {saved_name} when saved but uses {name} now; "
                f"create it with numpy.random.Generator(numpy.random.{saved_name}())"
            )


def _check_cuda(saved: Any) -> None:
    if not isinstance(saved, list | tuple) or not all(
        isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in saved
    ):
        raise TypeError("expected a list of uint8 tensors")


def _generator_check(i: int, gen: Generator, saved: Any) -> Any:
    def check() -> None:
        _check_generator(i, gen, saved)
        if isinstance(gen, torch.Generator):
            torch.Generator(device=gen.device).set_state(saved["state"])
        else:
            type(gen.bit_generator)().state = _decode(saved["state"])

    return check


def _restore_generator(gen: Generator, saved: dict[str, Any]) -> None:
    if isinstance(gen, torch.Generator):
        gen.set_state(saved["state"])
    else:
        gen.bit_generator.state = _decode(saved["state"])


def _encode(value: Any) -> Any:
    """NumPy bit-generator state -> tensors and plain values (arrays keep their dtype)."""
    if isinstance(value, dict):
        return {key: _encode(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        # torch has no unsigned 32/64-bit types that every version saves, so keep the bits in
        # the signed type of the same width and record the real dtype.
        signed = (
            value.view(np.dtype(f"i{value.dtype.itemsize}")) if value.dtype.kind == "u" else value
        )
        return {_NDARRAY: torch.from_numpy(signed.copy()), "dtype": value.dtype.str}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if _NDARRAY in value:
            return value[_NDARRAY].numpy().view(np.dtype(value["dtype"])).copy()
        return {key: _decode(item) for key, item in value.items()}
    return value
