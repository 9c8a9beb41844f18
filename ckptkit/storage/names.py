"""What a name inside a checkpoint may be: the one home of that rule.

A checkpoint may only name files that lie inside it. Every name a manifest, an index
file (HF shard maps) or a foreign layout hands us passes through
:func:`check_member_name` before anything is opened, listed or deleted with it.
"""

from __future__ import annotations

import re

# One path component: no separators, no control characters (a newline in a name would
# split one-line messages, NUL ends C strings), not "." or "..", not empty, and short
# enough for every filesystem we write to.
_COMPONENT = re.compile(r"^[^/\\\x00-\x1f\x7f]{1,255}$")


class UnsafeNameError(ValueError):
    """A member name that would point outside its checkpoint (or is malformed)."""


def check_member_name(name: object, *, allow_subdirs: bool = False) -> str:
    """Return ``name`` when it is a plain relative name inside a checkpoint, else raise.

    Refused: non-strings, empty names, absolute paths, ``..``/``.``/empty components,
    backslashes and control characters (NUL, newline...), and (unless
    ``allow_subdirs``) any ``/``. With
    ``allow_subdirs`` every ``/``-separated component is checked on its own; only
    layouts documented in docs/FORMAT.md use sub-folders.
    """
    if not isinstance(name, str):
        raise UnsafeNameError(f"a file name must be a string, got {type(name).__name__}")
    if not name:
        raise UnsafeNameError("empty file name")
    if name.startswith("/"):
        raise UnsafeNameError(f"absolute path {name!r}")
    parts = name.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise UnsafeNameError(f"{name!r} has a {part or 'empty'!r} path component")
        if not _COMPONENT.match(part):
            raise UnsafeNameError(f"{name!r} has an invalid path component {part!r}")
    if len(parts) > 1 and not allow_subdirs:
        raise UnsafeNameError(f"{name!r} names a sub-folder, which this layout does not have")
    return name
