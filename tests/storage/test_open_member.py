"""Conformance of ``Storage.open_member``, the confined opener, on every backend: a
regular file of the recorded size, bounded reads, refused names, missing keys."""

from __future__ import annotations

import pytest

from ckptkit.errors import CorruptCheckpointError
from ckptkit.storage.base import Storage
from ckptkit.storage.confined import open_member, read_member

DATA = b"0123456789" * 100


def test_reads_exactly_the_recorded_size(storage: Storage) -> None:
    storage.write_bytes("step-1/state.pt", DATA)
    with open_member(storage, "step-1/state.pt", size=len(DATA)) as member:
        assert member.size == len(DATA)
        assert member.head(4) == DATA[:4]
        assert member.read() == DATA
    assert read_member(storage, "step-1/state.pt") == DATA


@pytest.mark.parametrize("recorded", [len(DATA) - 1, len(DATA) + 1, 0])
def test_other_size_than_recorded_is_corrupt_and_quotes_only_the_record(
    storage: Storage, recorded: int
) -> None:
    storage.write_bytes("step-1/state.pt", DATA)
    with pytest.raises(CorruptCheckpointError, match="state.pt") as err:
        open_member(storage, "step-1/state.pt", size=recorded).read()
    # Only the text after the member's URL (whose random root may hold any digits).
    said = str(err.value).split("state.pt", 1)[1]
    assert str(recorded) in said and str(len(DATA)) not in said


def test_max_size_caps_files_without_a_record(storage: Storage) -> None:
    storage.write_bytes("index.json", DATA)
    with pytest.raises(CorruptCheckpointError, match="index.json"):
        open_member(storage, "index.json", max_size=len(DATA) - 1)


def test_missing_member_is_file_not_found(storage: Storage) -> None:
    storage.write_bytes("step-1/state.pt", DATA)
    with pytest.raises(FileNotFoundError):
        open_member(storage, "step-1/other.pt", size=1)
    with pytest.raises(FileNotFoundError):
        open_member(storage, "step-2/state.pt")


@pytest.mark.parametrize(
    "key", ["../state.pt", "step-1/../../state.pt", "step-1/./state.pt", "/state.pt", "a//b"]
)
def test_names_outside_are_refused_before_anything_is_opened(storage: Storage, key: str) -> None:
    storage.write_bytes("state.pt", DATA)
    with pytest.raises(CorruptCheckpointError):
        open_member(storage, key)


def test_a_directory_is_not_a_member(storage: Storage) -> None:
    storage.write_bytes("step-1/sub/state.pt", DATA)
    storage.flush()  # Drive: the folder is on the mount, not only in the queue
    with pytest.raises(CorruptCheckpointError, match="sub"):
        open_member(storage, "step-1/sub")
