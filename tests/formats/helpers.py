"""Shared helpers for the format tests: numpy-1.x-style pickles and a plainness check."""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch

PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.Tensor, torch.dtype, torch.device)


class _Numpy1Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes numpy 2's ``numpy._core`` globals under numpy 1.x's ``numpy.core`` path, as
    a file saved with numpy 1.x would name them (torch.save uses protocol 2, whose GLOBAL
    opcode is plain text, so the rename is byte-exact)."""

    def __init__(self, file: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(file, *args, **kwargs)
        write = self.write
        self.write = lambda b: write(b.replace(b"numpy._core.", b"numpy.core."))


class numpy1_pickle:  # noqa: N801 - stands in for the ``pickle`` module
    Pickler = _Numpy1Pickler
    Unpickler = pickle.Unpickler


def torch_bytes(obj: Any, *, numpy1: bool = False, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    kwargs: dict[str, Any] = {"pickle_module": numpy1_pickle} if numpy1 else {}
    if legacy:
        kwargs["_use_new_zipfile_serialization"] = False
    torch.save(obj, buf, **kwargs)
    data = buf.getvalue()
    if numpy1:
        assert b"numpy.core.multiarray" in data and b"numpy._core" not in data
    return data


def assert_plain(obj: Any, where: str = "state") -> None:
    """Fail unless ``obj`` holds only tensors and primitives (no numpy, no objects)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, (str, int)), f"{where}: key {k!r}"
            assert_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            assert_plain(v, f"{where}[{i}]")
    else:
        assert isinstance(obj, PLAIN), f"{where} is a {type(obj).__module__}.{type(obj).__name__}"
