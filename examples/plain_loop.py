"""A plain PyTorch loop made resumable with ckptkit (the README's example).

    python examples/plain_loop.py --run runs/plain --steps 300
    # kill it (Ctrl+C, SIGTERM, or kill -9) and run the same command again: it resumes.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ckptkit import CheckpointManager, EarlyStopping, ResumableDataLoader, RNGState


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/plain", help="run URL (path, gs://, drive://, ...)")
    parser.add_argument("--steps", type=int, default=300, help="total optimizer steps")
    parser.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    args = parser.parse_args()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=g)
    y = x @ torch.randn(16, 1, generator=g) + 0.1 * torch.randn(2048, 1, generator=g)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=args.steps)
    loader = ResumableDataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, seed=0)

    # --- the ckptkit part ------------------------------------------------------
    mgr = CheckpointManager(args.run, keep_last=3, keep_best=1, best_metric="loss",
                            save_every_steps=args.save_every, handle_signals=True)
    state = {"model": model, "optimizer": opt, "scheduler": sched, "loader": loader,
             "rng": RNGState(), "early_stopping": EarlyStopping(patience=20), "step": 0, "epoch": 0}
    start = mgr.restore(state)  # None on a fresh run
    print(f"resumed at step {start}" if start is not None else "fresh run")
    # ---------------------------------------------------------------------------

    step, epoch = state["step"], state["epoch"]
    while step < args.steps and not mgr.should_stop:
        loader.set_epoch(epoch)
        for xb, yb in loader:
            loss = nn.functional.mse_loss(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            state["step"] = step
            mgr.maybe_save(step, state, metrics={"loss": loss.item()})
            if step >= args.steps or mgr.should_stop:
                break
        else:
            epoch += 1
            state["epoch"] = epoch
    if not mgr.should_stop and (latest := mgr.latest()) is not None and latest.step != step:
        mgr.save(step, state)
    mgr.close()
    print(f"stopped at step {step} ({mgr.stop_reason or 'done'})")
    return mgr.exit_code


if __name__ == "__main__":
    sys.exit(main())
