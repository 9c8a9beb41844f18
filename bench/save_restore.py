"""Save and restore of a GPT-2-shaped state + AdamW: ckptkit against the disk itself,
``torch.save``, safetensors and ``torch.distributed.checkpoint`` (save only: its load is
several times slower than ``torch.load`` here and no target names it), all rows
interleaved in one process on the same state, page cache warm.

Every restore is followed, inside its timing, by a read of every restored byte (a sum
per tensor), so a loader that maps lazily pays for its reads where the others do; after
each restore (untimed) the state's hash is compared with the saved one, so a row that
restores the wrong bytes says so instead of looking fast.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import _state, _writers
from bench._harness import NA, Samples, Target, fmt_ratio, interleaved, mb, ratio, table, timed

RAW = "raw write + fsync of a new file (the disk)"
RAW_INPLACE = "raw write + fsync over the previous file (frees its blocks meanwhile)"
TORCH = "torch.save + fsync"
ST = "safetensors save_file + fsync"
DCP = "torch.distributed.checkpoint.save"
SYNC = "ckptkit save (sync)"
ASYNC_BLOCK = "ckptkit save (async): blocked in save()"
ASYNC_COMMIT = "ckptkit save (async): until committed (save() + wait())"

T_LOAD = "torch.load + load_state_dict"
ST_LOAD = "safetensors load_file + load_state_dict"
VERIFIED = "ckptkit restore (verified, the default)"
UNVERIFIED = "ckptkit restore (verify=False)"


@dataclass
class SizeResult:
    """One state size: its bytes, each row's samples (None: not in this build), and
    whether every restore gave back the saved bytes."""

    target_mb: float
    nbytes: int
    tensors: int
    reps: int
    save: dict[str, Samples | None] = field(default_factory=dict)
    restore: dict[str, Samples | None] = field(default_factory=dict)
    restored_ok: dict[str, bool] = field(default_factory=dict)


def _reps_for(target_mb: float, reps: int) -> int:
    # A 1 GB state costs ~5 s a repetition on 2 cores for save alone; three keep the
    # whole run short and still show a spread. The table says so.
    return min(reps, 3) if target_mb >= 1000 else reps


def measure(
    target_mb: float, reps: int, root: Path, *, save: bool, restore: bool, warmup: bool = True
) -> SizeResult:
    model, opt = _state.build(target_mb)
    state = _writers.ckptkit_state(model, opt)
    n = _reps_for(target_mb, reps)
    result = SizeResult(target_mb, _state.nbytes(model, opt), len(_state.tensors(model, opt)), n)
    dirs = {k: root / k for k in ("raw", "torch", "st", "dcp", "sync", "async")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    sync = _writers.manager(str(dirs["sync"]))
    async_mgr = None
    if _writers.has_async_save():
        async_mgr = _writers.manager(str(dirs["async"]), async_save=True)
    steps = itertools.count(1)
    try:
        if save:
            _save_rows(result, model, opt, state, dirs, sync, async_mgr, steps, n, warmup)
        if restore:
            _restore_rows(result, model, opt, state, dirs, sync, steps, n, warmup)
    finally:
        for mgr in (sync, async_mgr):
            if mgr is not None:
                mgr.close()
        shutil.rmtree(root, ignore_errors=True)
    return result


def _save_rows(
    result: SizeResult,
    model: Any,
    opt: Any,
    state: dict[str, Any],
    dirs: dict[str, Path],
    sync: Any,
    async_mgr: Any,
    steps: itertools.count,
    reps: int,
    warmup: bool,
) -> None:
    buffers = _writers.raw_buffers(model, opt)
    blocked = Samples()

    def async_save() -> None:  # timed whole: until committed
        blocked.add(timed(lambda: async_mgr.save(next(steps), state)))
        async_mgr.wait()

    cases: dict[str, Callable[[], object]] = {
        RAW: lambda: _writers.raw_write(buffers, dirs["raw"] / "state.bin"),
        # For reference: what overwriting in place costs (torch.save users do it). On a
        # disk mounted with discard, freeing the old blocks is ~0.28 ms per MB, paid
        # inside the write; ckptkit frees the rotated checkpoint's off the save's time.
        RAW_INPLACE: lambda: _writers.raw_write(buffers, dirs["raw"] / "inplace.bin"),
        TORCH: lambda: _writers.torch_save(model, opt, dirs["torch"]),
        ST: lambda: _writers.safetensors_save(model, opt, dirs["st"]),
        DCP: lambda: _writers.dcp_save(model, opt, dirs["dcp"]),
        SYNC: lambda: sync.save(next(steps), state),
    }
    if async_mgr is not None:
        cases[ASYNC_COMMIT] = async_save

    def before(name: str) -> None:
        if name == RAW:  # the disk's speed for fresh bytes, not also freeing the old file's
            (dirs["raw"] / "state.bin").unlink(missing_ok=True)

    def after(name: str) -> None:
        if name == SYNC:
            # Untimed, as training would run here: the blocks of the checkpoint rotation
            # removed are freed on a thread after save() returns (storage/freeing.py);
            # the other rows must not run beside that.
            sync.wait()
        # Untimed: what a row left for the device to finish (the discards of the blocks
        # an overwrite or unlink freed, issued at the next journal commit on a disk
        # mounted with discard) is not paid by the row after it. Without this, the row
        # after torch.save/DCP (which overwrite their files) measured 0.10 or 0.20 s at
        # 96 MB from run to run.
        os.sync()

    rows: dict[str, Samples | None] = dict(
        interleaved(cases, reps, before=before, after=after, warmup=warmup)
    )
    if warmup:
        del blocked.values[:1]  # the untimed round's
    commit = rows.pop(ASYNC_COMMIT, None)
    rows[ASYNC_BLOCK] = blocked if async_mgr is not None else None
    rows[ASYNC_COMMIT] = commit
    result.save = rows


def _restore_rows(
    result: SizeResult,
    model: Any,
    opt: Any,
    state: dict[str, Any],
    dirs: dict[str, Path],
    sync: Any,
    steps: itertools.count,
    reps: int,
    warmup: bool,
) -> None:
    # What each restore reads, written once here (untimed) so this section stands alone.
    _writers.torch_save(model, opt, dirs["torch"])
    _writers.safetensors_save(model, opt, dirs["st"])
    sync.save(next(steps), state)
    expected = _state.digest(model, opt)

    def loaded(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            fn()
            _state.touch(model, opt)

        return run

    cases = {
        T_LOAD: loaded(lambda: _writers.torch_load(model, opt, dirs["torch"])),
        ST_LOAD: loaded(lambda: _writers.safetensors_load(model, opt, dirs["st"])),
        VERIFIED: loaded(lambda: sync.restore(state)),
        UNVERIFIED: loaded(lambda: sync.restore(state, verify=False)),
    }
    ok = dict.fromkeys(cases, True)

    def check(name: str) -> None:
        ok[name] = ok[name] and _state.digest(model, opt) == expected

    result.restore = dict(
        interleaved(
            cases,
            reps,
            before=lambda _: _state.scramble(model, opt),
            after=check,
            warmup=warmup,
        )
    )
    result.restored_ok = ok


# -- tables -----------------------------------------------------------------------------
def _size_title(r: SizeResult) -> str:
    reps = f"{r.reps} interleaved repetitions"
    if r.target_mb >= 1000:
        reps += " (fewer for the largest state, to keep the run short)"
    return f"### {mb(r.nbytes)} state ({r.tensors} tensors), {reps}"


def _row(name: str, s: Samples | None, nbytes: int, refs: dict[str, Samples | None]) -> list[str]:
    if s is None:
        return [name, NA, "", *["" for _ in refs]]
    gbs = f"{nbytes / s.median / 1e9:.2f}"
    vs = [fmt_ratio(ratio(ref.median, s.median)) if ref else "–" for ref in refs.values()]
    return [name, s.show(), gbs, *vs]


def save_tables(results: list[SizeResult]) -> tuple[list[str], list[Target]]:
    blocks, targets = [], []
    for r in results:
        refs = {"disk": r.save.get(RAW), "torch.save": r.save.get(TORCH)}
        rows = [_row(name, s, r.nbytes, refs) for name, s in r.save.items()]
        blocks += [
            _size_title(r),
            table(
                ["save", "time: median (min–max)", "GB/s", "speed vs the disk", "vs torch.save"],
                rows,
                "lrrrr",
            ),
        ]
        targets += save_targets(r)
    return blocks, targets


def save_targets(r: SizeResult) -> list[Target]:
    sync, raw, tsave = r.save.get(SYNC), r.save.get(RAW), r.save.get(TORCH)
    blocked = r.save.get(ASYNC_BLOCK)
    size = mb(r.nbytes)
    out = []
    if sync and raw:
        v = raw.median / sync.median
        out.append(Target(f"{size}: sync save ≥ 0.9× the disk", f"{v:.2f}×", v >= 0.9))
    if sync and tsave:
        v = tsave.median / sync.median
        out.append(Target(f"{size}: sync save ≥ 1.2× torch.save", f"{v:.2f}×", v >= 1.2))
    if sync and blocked:
        v = blocked.median / sync.median
        out.append(
            Target(f"{size}: async save blocks ≤ 10 % of a sync save", f"{v:.0%}", v <= 0.10)
        )
    else:
        out.append(Target(f"{size}: async save blocks ≤ 10 % of a sync save", NA, None))
    return out


def restore_tables(results: list[SizeResult]) -> tuple[list[str], list[Target]]:
    blocks, targets = [], []
    for r in results:
        refs = {"torch.load": r.restore.get(T_LOAD), "safetensors": r.restore.get(ST_LOAD)}
        rows = [
            [*_row(name, s, r.nbytes, refs), "yes" if r.restored_ok.get(name) else "**NO**"]
            for name, s in r.restore.items()
        ]
        blocks += [
            _size_title(r),
            table(
                [
                    "restore (+ read every byte)",
                    "time: median (min–max)",
                    "GB/s",
                    "speed vs torch.load",
                    "vs safetensors",
                    "restored bytes equal the saved",
                ],
                rows,
                "lrrrrl",
            ),
        ]
        targets += restore_targets(r)
    return blocks, targets


def restore_targets(r: SizeResult) -> list[Target]:
    verified, tload, st = (r.restore.get(k) for k in (VERIFIED, T_LOAD, ST_LOAD))
    size = mb(r.nbytes)
    out = []
    if verified and tload:
        v = tload.median / verified.median
        out.append(Target(f"{size}: verified restore ≥ 1.5× torch.load", f"{v:.2f}×", v >= 1.5))
    if verified and st:
        v = st.median / verified.median
        out.append(
            Target(f"{size}: verified restore ≥ 0.5× bare safetensors", f"{v:.2f}×", v >= 0.5)
        )
    bad = [name for name, good in r.restored_ok.items() if not good]
    out.append(
        Target(
            f"{size}: every restore gives back the saved bytes",
            "all equal" if not bad else "differ: " + ", ".join(bad),
            not bad,
        )
    )
    return out
