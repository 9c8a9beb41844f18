"""Fitting a saved model state dict to the model it is restored into, when only a
wrapper's prefix differs: ``torch.compile``'s ``_orig_mod.``, DDP/DataParallel's
``module.``, a LightningModule's attribute (``net.``, ``model.``), or the reverse (a
plain save restored into a wrapped model).

Only ``restore`` maps: ``load`` and ``inspect`` return the names as stored. A mapping is
taken only when it makes the names match the target's exactly; otherwise the names are
left as they are and the model check explains the mismatch.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from typing import Any


def _chain(keys: Collection[str]) -> list[str]:
    """The dotted prefixes every key shares, shortest first (``""`` included)."""
    first = next(iter(keys))
    parts = first.split(".")[:-1]
    out = [""]
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i]) + "."
        if not all(k.startswith(prefix) for k in keys):
            break
        out.append(prefix)
    return out


def _candidates(keys: Collection[str], wanted: Collection[str]) -> Iterator[tuple[str, str]]:
    """``(strip, add)`` pairs to try, least change first: prefixes shared by every saved
    key, then one top-level name (a LightningModule holding the model beside others)."""
    adds = _chain(wanted)
    strips = _chain(keys)
    firsts = sorted({k.split(".", 1)[0] + "." for k in keys if "." in k} - set(strips))
    for strip in strips + firsts:
        for add in adds:
            if strip or add:
                yield strip, add


def fit_to_model(
    saved: Mapping[str, Any], wanted: Collection[str]
) -> tuple[Mapping[str, Any], str | None]:
    """``(saved mapped to the names in wanted, a note saying how)``, or ``(saved, None)``
    when the names already match or no prefix change makes them match."""
    keys = [k for k in saved if isinstance(k, str)]
    want = set(wanted)
    if not keys or len(keys) != len(saved) or not want or set(keys) == want:
        return saved, None
    for strip, add in _candidates(keys, want):
        mapped = {add + k[len(strip) :]: v for k, v in saved.items() if k.startswith(strip)}
        if set(mapped) == want and len(mapped) == len(want):
            return mapped, _note(strip, add, len(saved) - len(mapped))
    return saved, None


def _note(strip: str, add: str, dropped: int) -> str:
    if strip and add:
        how = f"weight-name prefix '{strip}' replaced by '{add}'"
    elif strip:
        how = f"weight-name prefix '{strip}' stripped"
    else:
        how = f"weight-name prefix '{add}' added"
    also = f"; {dropped} entries outside '{strip}' not restored" if dropped else ""
    return (
        f"{how} to fit the model (saved from or into a torch.compile, DDP or Lightning "
        f"wrapper){also}"
    )
