"""Run by tests/distributed/test_torchrun.py under torchrun (2 ranks, gloo on CPU):
library scenarios of a distributed CheckpointManager; each rank writes what it saw
to ``<out>/rank-<R>.json``."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.utils.data import TensorDataset

import ckptkit


def main(run: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    seen: dict = {}
    torch.manual_seed(100 + rank)  # every rank draws its own stream
    loader = ckptkit.ResumableDataLoader(
        TensorDataset(torch.arange(40.0)), batch_size=2, shuffle=True, rank=rank, world_size=2
    )
    batches = iter(loader)
    next(batches)
    state = {"rng": ckptkit.RNGState(), "loader": loader, "w": torch.zeros(2)}
    mgr = ckptkit.CheckpointManager(run)
    info = mgr.save(1, state)
    seen["saved"] = None if info is None else info.name
    after_save = torch.rand(3).tolist()
    next(batches)
    torch.manual_seed(999)
    result = mgr.restore(state)
    seen["restored"] = result.step
    seen["rng_back"] = torch.rand(3).tolist() == after_save
    seen["draws"] = after_save
    seen["loader_batch"] = loader.batch_index
    try:  # rank 0 alone fails (a NaN metric): every rank must raise, none may hang
        mgr.save(2, state, metrics={"loss": math.nan if rank == 0 else 1.0})
        seen["error"] = None
    except ckptkit.CkptError as exc:
        seen["error"] = type(exc).__name__
    mgr.close()
    from torch.distributed.fsdp import fully_shard

    sharded = torch.nn.Linear(2, 2)
    fully_shard(sharded)
    if rank == 0:  # a manager of rank 0 alone would save rank 0's shards only: refused
        try:
            alone = ckptkit.CheckpointManager(run + "-alone", distributed=False)
            alone.save(1, {"app": ckptkit.ShardedState(sharded)})
            seen["alone"] = None
        except ckptkit.CkptError as exc:
            seen["alone"] = type(exc).__name__
    # A rank 0 that never takes part: rank 1 gives up after the timeout.
    lone = ckptkit.CheckpointManager(run + "-lone", distributed_timeout=3)
    if rank == 1:
        started = time.monotonic()
        try:
            lone.save(1, {"w": torch.zeros(1)})
            seen["timeout"] = None
        except ckptkit.CkptError as exc:
            seen["timeout"] = type(exc).__name__
        seen["waited"] = time.monotonic() - started
    with open(os.path.join(out, f"rank-{rank}.json"), "w") as f:
        json.dump(seen, f)
    if rank == 0:
        time.sleep(6)  # past rank 1's timeout
    os._exit(0)  # the lone group is broken by design: skip its teardown


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
