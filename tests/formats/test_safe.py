"""safe_torch_load / safe_safetensors_load: numpy allowlist, refusal, corruption."""

from __future__ import annotations

import io
import os
import pickle
import random
import threading
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from ckptkit.errors import CheckpointNotFoundError, CorruptCheckpointError, UnsafeCheckpointError
from ckptkit.formats.safe import (
    NUMPY_ALLOWLIST,
    safe_safetensors_load,
    safe_torch_load,
    to_plain,
    unsafe_global,
)

from .helpers import assert_plain, torch_bytes

NUMPY_VALUES = {
    "f64": (np.float64(0.25), 0.25),
    "f32": (np.float32(1.5), 1.5),
    "i64": (np.int64(7), 7),
    "u8": (np.uint8(3), 3),
    "bool": (np.bool_(True), True),
}


class Marker:
    """Pickles as a call to os.system: what a malicious checkpoint does."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class Custom:
    """An ordinary user class: not on the allowlist either."""

    def __init__(self) -> None:
        self.value = 3


@pytest.fixture(autouse=True)
def _allowlist_is_restored():
    before = set(torch.serialization.get_safe_globals())
    yield
    assert set(torch.serialization.get_safe_globals()) == before


@pytest.mark.parametrize("numpy1", [False, True], ids=["numpy2-paths", "numpy1-paths"])
def test_numpy_values_load_as_plain(numpy1: bool) -> None:
    obj = {name: v for name, (v, _) in NUMPY_VALUES.items()}
    obj["arr"] = np.arange(6, dtype=np.float32).reshape(2, 3)
    obj["be"] = np.arange(3, dtype=">i4")
    obj["np_rng"] = np.random.get_state()
    obj["py_rng"] = py_state = random.getstate()
    obj["dtype"] = np.dtype("float64")
    obj["t"] = torch.ones(2)
    data = torch_bytes(obj, numpy1=numpy1)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(io.BytesIO(data), weights_only=True)  # what users hit since torch 2.6

    out = safe_torch_load(data, source="mem")
    assert_plain(out)
    for name, (_, expected) in NUMPY_VALUES.items():
        assert out[name] == expected and type(out[name]) is type(expected)
    assert torch.equal(out["arr"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert out["be"].tolist() == [0, 1, 2]
    assert out["dtype"] == "float64"
    name, keys, pos, _, _ = out["np_rng"]
    assert name == "MT19937" and keys.shape == (624,) and isinstance(pos, int)
    assert out["py_rng"] == py_state


def test_allowlist_is_exactly_numpy_pieces() -> None:
    names = {
        g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"
        for g in NUMPY_ALLOWLIST
    }
    assert {
        "numpy.dtype",
        "numpy.ndarray",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
    } <= names
    others = names - {
        "numpy.dtype",
        "numpy.ndarray",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
    }
    # the rest are dtype classes of fixed-size numbers (Float64DType... / dtype[float64])
    assert others and all("DType" in n or n.startswith("numpy.dtype[") for n in others)
    assert not any(k in n for n in others for k in ("Object", "Str", "Void", "Bytes", "object"))


def test_malicious_pickle_is_refused_and_not_run(tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "x": Marker(str(marker))}, path)
    for data in (path.read_bytes(), str(path)):
        with pytest.raises(UnsafeCheckpointError, match=r"system.*trust") as exc:
            safe_torch_load(data, source="evil.pt")
        assert "evil.pt" in str(exc.value) and "\n" not in str(exc.value)
    assert not marker.exists()


def test_custom_class_is_refused_by_name() -> None:
    data = torch_bytes({"c": Custom()})
    with pytest.raises(UnsafeCheckpointError, match=r"Custom") as exc:
        safe_torch_load(data, source="c.pt")
    assert "trust" in str(exc.value)


def test_object_arrays_are_refused() -> None:
    data = torch_bytes({"a": np.array([1, "x"], dtype=object)})
    with pytest.raises(UnsafeCheckpointError, match="ObjectDType"):
        safe_torch_load(data, source="o.pt")


def test_trust_loads_everything_with_a_loud_warning(caplog) -> None:
    data = torch_bytes({"c": Custom(), "f": np.float64(2.0)})
    with pytest.warns(UserWarning, match="executing pickled code from c.pt"):
        out = safe_torch_load(data, source="c.pt", trust=True)
    assert out["c"].value == 3 and out["f"] == 2.0 and type(out["f"]) is float
    assert "executing pickled code from c.pt" in caplog.text


def _saved(legacy: bool = False) -> bytes:
    return torch_bytes({"w": torch.arange(1000.0), "best": np.float64(1.0)}, legacy=legacy)


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],
        lambda b: b[:-10],
        lambda b: b[:200],
        lambda b: b"",
        lambda b: os.urandom(4096),
        lambda b: b[:100] + bytes(x ^ 0xFF for x in b[100:120]) + b[120:],
    ],
    ids=["half", "tail", "head", "empty", "random", "flipped"],
)
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_damaged_files_are_corrupt(damage, legacy: bool, tmp_path) -> None:
    data = damage(_saved(legacy))
    path = tmp_path / "ck.pt"
    path.write_bytes(data)
    for arg in (data, str(path)):
        with pytest.raises(CorruptCheckpointError, match="ck.pt"):
            safe_torch_load(arg, source="ck.pt")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip-mmap", "legacy"])
def test_path_loads(legacy: bool, tmp_path) -> None:
    path = tmp_path / "ck.pt"
    path.write_bytes(_saved(legacy))
    out = safe_torch_load(str(path), source=str(path))
    assert torch.equal(out["w"], torch.arange(1000.0)) and out["best"] == 1.0


def test_missing_path_is_not_found(tmp_path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        safe_torch_load(str(tmp_path / "nope.pt"), source="nope.pt")


def test_concurrent_loads_share_the_allowlist() -> None:
    data = _saved()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(15):
                assert safe_torch_load(data, source="m")["best"] == 1.0
        except BaseException as exc:  # collected for the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_user_safe_globals_survive() -> None:
    before = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([np.dtype])
    try:
        safe_torch_load(_saved(), source="m")
        assert np.dtype in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def test_safetensors(tmp_path) -> None:
    tensors = {"a": torch.ones(3), "b": torch.zeros(2, dtype=torch.int64)}
    data = st_save(tensors)
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    for arg in (data, str(path)):
        out = safe_safetensors_load(arg, source="m")
        assert out.keys() == tensors.keys() and torch.equal(out["a"], tensors["a"])
    for bad in (data[: len(data) - 5], data[:20], b"", b"{not json"):
        with pytest.raises(CorruptCheckpointError, match="m.safetensors"):
            safe_safetensors_load(bad, source="m.safetensors")
    with pytest.raises(CheckpointNotFoundError):
        safe_safetensors_load(str(tmp_path / "x.safetensors"), source="x")


def test_unsafe_global_parses_torch_messages() -> None:
    assert (
        unsafe_global(
            "Unsupported global: GLOBAL __main__.Foo was not an allowed global by default."
        )
        == "__main__.Foo"
    )
    assert (
        unsafe_global(
            "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."
        )
        == "posix.system"
    )
    assert (
        unsafe_global("Can only build Tensor, ... but got <class 'numpy.dtypes.ObjectDType'>")
        == "numpy.dtypes.ObjectDType"
    )
    assert unsafe_global("Unsupported operand 149") is None


def test_to_plain_keeps_unchanged_containers() -> None:
    sd = OrderedDict(w=torch.ones(1))
    assert to_plain(sd) is sd
    mixed = OrderedDict(w=torch.ones(1), s=np.float64(1.0))
    out = to_plain(mixed)
    assert isinstance(out, OrderedDict) and type(out["s"]) is float
    assert to_plain((np.int64(1), [np.float32(2)])) == (1, [2.0])
