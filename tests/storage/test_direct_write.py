"""Large checkpoint files are written around the page cache (O_DIRECT, through an
aligned bounce buffer) on ext4/xfs/btrfs, and through the cache elsewhere: either way
the file holds exactly the bytes given, whatever their sizes and alignment."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ckptkit.storage import direct
from ckptkit.storage.local import LocalStorage

MB = 1 << 20


def _chunks(data: bytes, sizes: list[int]) -> list[memoryview]:
    out, at, view = [], 0, memoryview(data)
    for n in sizes:
        out.append(view[at : at + n])
        at += n
    out.append(view[at:])
    return out


def _payload(total: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, total, dtype=np.uint8).tobytes()


@pytest.mark.parametrize(
    ("total", "sizes"),
    [
        (direct.MIN_SIZE, []),  # exactly the threshold, one chunk
        (direct.MIN_SIZE + 1, [1, 4095, 4097]),  # odd pieces, a one-byte tail
        (3 * direct.BUFFER + 12345, [7, direct.BUFFER, 3 * MB + 5, 1]),  # spans buffers
        (2 * direct.BUFFER, [direct.BUFFER, direct.BUFFER]),  # ends on a boundary
    ],
)
def test_a_large_file_holds_exactly_its_bytes(tmp_path: Path, total: int, sizes: list[int]) -> None:
    data = _payload(total, total)
    storage = LocalStorage(str(tmp_path))
    storage.write_stream("f.bin", _chunks(data, sizes), total)
    assert (tmp_path / "f.bin").read_bytes() == data


def _skip_unless_direct(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        if not direct.usable(fd, direct.MIN_SIZE):
            pytest.skip("the test folder is not on ext4/xfs/btrfs here")
    finally:
        os.close(fd)


def test_the_direct_path_is_taken_on_this_disk(tmp_path: Path) -> None:
    """On the ext4 of these machines the path under test is really O_DIRECT (else the
    test above would only cover the buffered fallback)."""
    _skip_unless_direct(tmp_path)
    path = tmp_path / "probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert direct._set_direct(fd, True)
        assert direct.write(fd, [memoryview(b"x" * (direct.BUFFER + 10))]) == direct.BUFFER + 10
    finally:
        os.close(fd)
    assert path.read_bytes() == b"x" * (direct.BUFFER + 10)


def test_bounce_buffers_are_sized_to_the_file() -> None:
    """Two bounce buffers are a write's extra memory: 1/64 of the file, 1 to 8 MiB, so a
    small checkpoint does not pay 16 MiB for them."""
    assert direct.buffer_size(None) == direct.BUFFER
    assert direct.buffer_size(direct.MIN_SIZE) == direct.MIN_BUFFER
    assert direct.buffer_size(256 * MB) == 4 * MB
    assert direct.buffer_size(8 << 30) == direct.BUFFER
    assert direct.buffer_size(100 * MB + 1) % direct.ALIGN == 0


def test_kept_buffers_of_another_size_still_write_exact_bytes(tmp_path: Path) -> None:
    """A write reuses a kept buffer larger than it needs (filled only to its own size);
    files of different sizes one after the other, each byte for byte."""
    _skip_unless_direct(tmp_path)
    direct._pool.clear()
    for i, (total, size) in enumerate(
        [
            (direct.BUFFER * 2 + 99, None),
            (direct.MIN_SIZE + 4097, direct.MIN_SIZE + 4097),
            (5 * MB + 3, 300 * MB),
            (direct.BUFFER + 1, None),
        ]
    ):
        data = _payload(total, i)
        path = tmp_path / f"f{i}.bin"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            assert direct.write(fd, _chunks(data, [1, 3 * MB]), size) == total
        finally:
            os.close(fd)
        assert path.read_bytes() == data
        assert len(direct._pool) <= 2


def test_a_filesystem_that_refuses_o_direct_gets_a_buffered_write() -> None:
    """tmpfs refuses O_DIRECT: direct.write still writes every byte (through the cache)."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    data = _payload(direct.BUFFER + 777, 1)
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        path = Path(d) / "f.bin"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            assert direct.write(fd, _chunks(data, [5, 4096])) == len(data)
        finally:
            os.close(fd)
        assert path.read_bytes() == data


@pytest.fixture
def small_ext4(tmp_path: Path) -> Iterator[Path]:
    """A real 40 MB ext4 (a loop mount: root in CI), where O_DIRECT is used."""
    image, mnt = tmp_path / "ext4.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(40 * MB)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True)
    mounted = (
        made.returncode == 0
        and (
            subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True)
        ).returncode
        == 0
    )
    if not mounted:
        pytest.skip("cannot make and loop-mount an ext4 here (needs root and mkfs.ext4)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_during_a_direct_write_loses_nothing(small_ext4: Path) -> None:
    """ENOSPC in the middle of a direct write of a 20 MB file is a one-line StorageError;
    the previous checkpoint still restores exactly and nothing half-written is left."""
    import torch

    import ckptkit

    run = small_ext4 / "run"
    first = {"model": torch.nn.Linear(2560, 2048)}  # ~20 MB of weights: the direct path
    with ckptkit.CheckpointManager(str(run), keep_last=3) as mgr:
        mgr.save(1, first)
        with pytest.raises(ckptkit.StorageError, match="disk is full"):
            mgr.save(2, {"model": torch.nn.Linear(2560, 2048)})
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("step-", ".tmp"))) == [
        "step-000000000001"
    ]
    fresh = {"model": torch.nn.Linear(2560, 2048)}
    with ckptkit.CheckpointManager(str(run)) as mgr:
        assert mgr.restore(fresh).step == 1
    assert torch.equal(fresh["model"].weight, first["model"].weight)
