"""The one rule for names inside a checkpoint (storage/names.py)."""

from __future__ import annotations

import pytest

from ckptkit.storage.names import UnsafeNameError, check_member_name

REFUSED = [
    "",
    "/etc/passwd",
    "..",
    ".",
    "../x",
    "a/../b",
    "a//b",
    "a/./b",
    "a/",
    "a\\b",
    "..\\x",
    "a\x00b",
    "a\nb",
    "a\rb",
    "a\x7fb",
    "x" * 256,
]


@pytest.mark.parametrize("name", REFUSED)
def test_refused_even_with_subdirs(name: str) -> None:
    with pytest.raises(UnsafeNameError):
        check_member_name(name, allow_subdirs=True)


@pytest.mark.parametrize("name", [None, 3, b"model.safetensors", ["a"]])
def test_non_strings_refused(name: object) -> None:
    with pytest.raises(UnsafeNameError):
        check_member_name(name)


@pytest.mark.parametrize("name", ["model.safetensors", "state.pt", "a b", "é.bin", "..a", "a.."])
def test_plain_names_accepted(name: str) -> None:
    assert check_member_name(name) == name


def test_subfolders_only_when_the_layout_allows_them() -> None:
    with pytest.raises(UnsafeNameError, match="sub-folder"):
        check_member_name("pytorch_model_fsdp_0/shard.bin")
    assert check_member_name("pytorch_model_fsdp_0/shard.bin", allow_subdirs=True)


def test_dotdot_is_named_as_the_problem() -> None:
    with pytest.raises(UnsafeNameError, match=r"'\.\.' path component"):
        check_member_name("../model.safetensors")
