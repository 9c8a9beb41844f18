"""A hand-written data-parallel loop with ckptkit under torchrun (gloo on CPU works).

    torchrun --standalone --nproc_per_node 2 examples/ddp_loop.py \\
        --output runs/ddp --max-steps 40 --save-steps 10 [--fsdp]

Run the same command again after a kill: it resumes from the newest valid checkpoint
and ends bit-identical to an uninterrupted run (each rank gets its own RNG and data
position back). ``--fsdp`` shards the model with FSDP2 ``fully_shard`` and saves it
through ``torch.distributed.checkpoint`` (``ckptkit.ShardedState``): such a run resumes
at another ``--nproc_per_node`` too. Tiny model, synthetic data.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import ckptkit


def die_with_parent() -> None:
    """torchrun starts each worker in a session of its own, so a SIGKILL to torchrun's
    process group leaves the workers training (and writing) on: have Linux kill this
    worker when torchrun dies."""
    if sys.platform.startswith("linux") and "TORCHELASTIC_RUN_ID" in os.environ:
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def init(fsdp: bool) -> tuple[int, int]:
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    elif fsdp:  # FSDP2 needs a process group, also for one process started without torchrun
        store = tempfile.mktemp(prefix="ddp-loop-")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="run URL (a path, gs://..., memory://...)")
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--save-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8, help="per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2, save through DCP")
    p.add_argument("--export", help="write the final full model and optimizer state here")
    args = p.parse_args()
    die_with_parent()
    rank, world = init(args.fsdp)

    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 1)
    )
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        net = model
    else:
        net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(args.seed * 1000 + 1 + rank)  # dropout differs per rank: RNG per rank

    g = torch.Generator().manual_seed(1234)
    x = torch.randn(512, 8, generator=g)
    y = x.sum(1, keepdim=True) * 0.5 + 0.1 * torch.randn(512, 1, generator=g)
    loader = ckptkit.ResumableDataLoader(
        TensorDataset(x, y), batch_size=args.batch_size, shuffle=True, seed=args.seed,
        rank=rank, world_size=world, drop_last=True,
    )  # fmt: skip
    state: dict = {"loader": loader, "rng": ckptkit.RNGState(), "step": 0}
    if args.fsdp:
        state["app"] = ckptkit.ShardedState(model, opt)
    else:
        state.update(model=model, optimizer=opt)

    # Every rank constructs, saves and restores; rank 0 alone writes.
    mgr = ckptkit.CheckpointManager(args.output, keep_last=2, save_every_steps=args.save_steps)
    with mgr:
        result = mgr.resume(state, "auto")
        step = int(state["step"])
        if rank == 0:
            print(f"resumed at step {step}" if result.resumed else "fresh start", flush=True)
        while step < args.max_steps:
            for xb, yb in loader:
                loss = F.mse_loss(net(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                state["step"] = step
                mgr.maybe_save(step, state)
                if step >= args.max_steps:
                    break
        saved = mgr.list()
        if not saved or saved[-1].step != step:
            mgr.save(step, state)
    if args.export:
        export(model, opt, args.export, rank)
    if rank == 0:
        print(f"done: step {step}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


def export(model: torch.nn.Module, opt: torch.optim.Optimizer, path: str, rank: int) -> None:
    """The full (unsharded) model and optimizer state, keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, opt, options=options)
    if rank == 0:
        torch.save({"model": model_sd, "optimizer": optim_sd}, path)


if __name__ == "__main__":
    main()
