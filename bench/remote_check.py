"""Quick check of the gs:// figures of issue 10 item 5 on the GCS emulator (not a
``bench_*`` module, so ``python -m bench`` does not run it; bench may fold it in):

    python -m bench.remote_check            # 100 MB, 5 repetitions, 10 vs 1,000 checkpoints

Prints, interleaved: gcsfs ``pipe`` vs ``FsspecStorage.write_bytes`` vs ckptkit ``save``
of the same 100 MB, and ``latest()`` at 10 and 1,000 checkpoints (local and gs://) with
the number of requests it sent. Medians; the machine's load is printed with them.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import tempfile
import time
import uuid

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def _upload(bucket: str, mb: int, reps: int) -> None:
    import torch

    from ckptkit import CheckpointManager
    from ckptkit.storage.fsspec_backend import FsspecStorage

    st = FsspecStorage(f"gs://{bucket}/upload")
    data = os.urandom(mb << 20)
    state = {"w": torch.frombuffer(bytearray(data), dtype=torch.uint8)}
    times: dict[str, list[float]] = {"gcsfs pipe": [], "write_bytes": [], "save": []}
    with CheckpointManager(f"gs://{bucket}/save", keep_last=1) as mgr:
        for i in range(reps):
            for name, call in (
                ("gcsfs pipe", lambda i=i: st._fs.pipe(f"{bucket}/pipe/x{i}", data)),
                ("write_bytes", lambda i=i: st.write_bytes(f"x{i}", data)),
                ("save", lambda i=i: mgr.save(i, state)),
            ):
                started = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - started)
    pipe = statistics.median(times["gcsfs pipe"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{mb} MB {name:12s} median {med:.3f} s  ({pipe / med:.2f}x pipe)  {ts}")


def _latest(bucket: str, counts: tuple[int, ...]) -> None:
    import gcsfs.core
    import torch

    from ckptkit import CheckpointManager
    from ckptkit import run as runmod
    from ckptkit.manifest import MANIFEST, checkpoint_name
    from ckptkit.storage.base import join_key
    from ckptkit.storage.registry import open_storage

    sent = [0]
    real = gcsfs.core.GCSFileSystem._call

    async def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        sent[0] += 1
        return await real(self, *args, **kwargs)

    gcsfs.core.GCSFileSystem._call = counted
    tmp = tempfile.mkdtemp()
    for kind in ("local", "gs"):
        for n in counts:
            url = f"gs://{bucket}/r{n}" if kind == "gs" else f"{tmp}/r{n}"
            with CheckpointManager(url, keep_last=None) as mgr:
                mgr.save(n, {"w": torch.zeros(1000)})
            st = open_storage(url)
            manifest = runmod.read_manifest(st, checkpoint_name(n))
            for s in range(1, n):  # older checkpoints: a manifest each (cheap to make)
                data = dataclasses.replace(manifest, step=s).to_bytes()
                st.write_bytes(join_key(checkpoint_name(s), MANIFEST), data)
            with CheckpointManager(url, readonly=True) as ro:
                ts = []
                for _ in range(7):
                    sent[0] = 0
                    started = time.perf_counter()
                    assert ro.latest().step == n
                    ts.append(time.perf_counter() - started)
            ms = statistics.median(ts) * 1000
            print(f"latest() {kind:5s} at {n:5d} checkpoints: {ms:6.1f} ms, {sent[0]} requests")


def main() -> None:
    sys.path.insert(0, os.getcwd())
    from tests.gcs_emulator import Emulator

    print(f"load average at start: {os.getloadavg()}")
    emu = Emulator().start()
    os.environ["STORAGE_EMULATOR_HOST"] = emu.host
    try:
        _upload(emu.create_bucket(f"u{uuid.uuid4().hex[:10]}"), 100, 5)
        _latest(emu.create_bucket(f"l{uuid.uuid4().hex[:10]}"), (10, 1000))
    finally:
        emu.stop()


if __name__ == "__main__":
    main()
