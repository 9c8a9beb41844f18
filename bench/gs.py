"""A ``gs://`` save of ~100 MB of GPT-2-shaped state on the emulator against gcsfs
``pipe`` of the same bytes as one object: how close ckptkit's upload comes to the wire."""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field

from bench import _gcs, _state, _writers
from bench._harness import Samples, Target, fmt_ratio, interleaved, mb, ratio, table

CKPTKIT = "ckptkit save (sync) to gs://"
PIPE = "gcsfs pipe of the same bytes (one object)"


@dataclass
class GsResult:
    nbytes: int
    reps: int
    samples: dict[str, Samples] = field(default_factory=dict)


def measure(megabytes: float, reps: int, server: _gcs.Server, *, warmup: bool = True) -> GsResult:
    warnings.simplefilter("ignore")
    model, opt = _state.build(megabytes)
    data = b"".join(_writers.raw_buffers(model, opt))
    bucket = server.bucket()
    fs = server.fs()
    steps = itertools.count(1)
    state = _writers.ckptkit_state(model, opt)
    with _writers.manager(f"gs://{bucket}/run") as mgr:
        cases = {
            CKPTKIT: lambda: mgr.save(next(steps), state),
            PIPE: lambda: fs.pipe(f"{bucket}/raw/state.bin", data),
        }
        samples = interleaved(cases, reps, warmup=warmup)
    return GsResult(len(data), reps, dict(samples))


def tables(r: GsResult | None, missing: str | None) -> tuple[list[str], list[Target]]:
    goal = "gs:// save ≥ 0.9× a gcsfs pipe of the same bytes"
    if r is None:
        return [f"{missing}"], [Target(goal, missing or "n/a", None)]
    pipe, ours = r.samples[PIPE], r.samples[CKPTKIT]
    rows = [
        [
            name,
            s.show(),
            f"{r.nbytes / s.median / 1e6:.0f}",
            fmt_ratio(ratio(pipe.median, s.median)),
        ]
        for name, s in r.samples.items()
    ]
    block = table(["upload", "time: median (min–max)", "MB/s", "speed vs pipe"], rows, "lrrr")
    note = (
        f"{mb(r.nbytes)} of GPT-2-shaped state + AdamW, {r.reps} interleaved repetitions, "
        "gcp-storage-emulator on 127.0.0.1 (in memory, a thread per connection); the ckptkit "
        "run keeps one checkpoint."
    )
    v = pipe.median / ours.median
    return [note, block], [Target(goal, f"{v:.2f}×", v >= 0.9)]
