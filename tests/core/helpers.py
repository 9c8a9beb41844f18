"""Small training states and file surgery shared by the core tests."""

from __future__ import annotations

import os
import threading
from typing import Any

import torch

from ckptkit.manifest import MANIFEST
from ckptkit.storage.local import LocalStorage


def make_training(seed: int = 0, width: int = 8) -> dict[str, Any]:
    """Model + AdamW + OneCycleLR after a few real steps (so moments and LR are non-trivial)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, 2)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=100)
    return {"model": model, "optimizer": opt, "scheduler": sched}


def train_steps(state: dict[str, Any], n: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(16, 4, generator=gen)
        loss = state["model"](x).pow(2).mean()
        loss.backward()
        state["optimizer"].step()
        state["scheduler"].step()
        state["optimizer"].zero_grad()


def tensors_equal(a: Any, b: Any) -> bool:
    """Bit-exact equality of nested state (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(tensors_equal(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return (
            type(a) is type(b)
            and len(a) == len(b)
            and all(tensors_equal(x, y) for x, y in zip(a, b, strict=True))
        )
    return a == b


def ckpt_dir(run: str, name: str) -> str:
    return os.path.join(run, name)


def flip_byte(path: str, offset: int = -1) -> None:
    """Damage one byte in place (the size stays the same: only sha256 can tell)."""
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END if offset < 0 else os.SEEK_SET)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def truncate(path: str, keep: int = 10) -> None:
    os.truncate(path, keep)


def manifest_path(run: str, name: str) -> str:
    return os.path.join(run, name, MANIFEST)


class ThreadOnlyStorage(LocalStorage):
    """``<scheme>:///dir`` (a test registers its scheme): a local directory that does not
    say so, so that every async save takes the thread path (the fork writer copies
    nothing)."""

    def __init__(self, url: str) -> None:
        super().__init__(url.split("://", 1)[1])
        self.url = url

    def local_path(self, key: str) -> str | None:
        return None


def in_thread(fn: Any) -> tuple[threading.Thread, list[BaseException]]:
    """Run ``fn`` in a daemon thread; its exception, if any, lands in the list."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors
