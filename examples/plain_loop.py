"""A plain PyTorch loop made resumable with ckptkit (the README's example, in full).

    python examples/plain_loop.py --run runs/plain --epochs 10
    # Stop it any way you like (Ctrl+C, kill -TERM, kill -9, --time-limit 20s) and run the
    # same command again: it resumes exactly where the newest checkpoint left off.

Exit code 0: finished (all epochs, or early stopping). Exit code 75: stopped early on
purpose by a signal or the time limit, after saving; run the same command again.
docs/RESUME.md explains what makes the pieces add up to one uninterrupted run.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ckptkit import CheckpointManager, EarlyStopping, ResumableDataLoader, RNGState


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", default="runs/plain", help="run URL (path, gs://, drive://, ...)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs to train")
    parser.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    parser.add_argument("--time-limit", help="save and exit 75 before this much time, e.g. 1h55m")
    parser.add_argument("--resume", default="auto", help="latest | auto | never | PATH")
    parser.add_argument(
        "--overwrite", action="store_true", help="with --resume never: delete old checkpoints"
    )
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2304, 16, generator=g)
    y = x @ torch.randn(16, 1, generator=g) + 0.1 * torch.randn(2304, 1, generator=g)
    train, (x_val, y_val) = TensorDataset(x[:2048], y[:2048]), (x[2048:], y[2048:])
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # As with DataLoader, shuffling is asked for (the default is shuffle=False).
    loader = ResumableDataLoader(
        train, batch_size=32, shuffle=True, seed=0, num_workers=args.workers
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=1e-2, total_steps=args.epochs * len(loader)
    )

    mgr = CheckpointManager(
        args.run,
        keep_last=3,
        keep_best=1,
        best_metric="val_loss",
        save_every_steps=args.save_every,
        handle_signals=True,
        time_limit=args.time_limit,
    )
    state = {
        "model": model,
        "optimizer": opt,
        "scheduler": sched,
        "loader": loader,
        "rng": RNGState(),
        "early_stopping": EarlyStopping(patience=3),
        "step": 0,
        "epoch": 0,
    }
    with mgr:  # releases the run lock and the signal handlers, even on an error
        result = mgr.resume(state, args.resume, overwrite=args.overwrite)
        if result.resumed:  # from which checkpoint, at which step and place in the data
            epoch, batch = loader.position
            print(
                f"resumed at step {result.step} from {result.source} "
                f"(epoch {epoch}, batch {batch})",
                flush=True,
            )
        else:
            print("fresh run", flush=True)
        stopper = state["early_stopping"]
        while state["epoch"] < args.epochs and not (mgr.should_stop or stopper.should_stop):
            loader.set_epoch(state["epoch"])  # keeps the position in the epoch being resumed
            for xb, yb in loader:
                loss = nn.functional.mse_loss(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                state["step"] += 1
                mgr.maybe_save(state["step"], state, metrics={"loss": loss.item()})
                if mgr.should_stop:  # a signal or the time limit: saved, leave now
                    break
            else:  # the epoch is complete: validate, then checkpoint its end
                model.eval()
                with torch.no_grad():
                    val_loss = nn.functional.mse_loss(model(x_val), y_val).item()
                model.train()
                stopper.step(val_loss, state["step"])
                state["epoch"] += 1
                mgr.maybe_save(state["step"], state, metrics={"val_loss": val_loss}, epoch_end=True)
                print(
                    f"epoch {state['epoch']} step {state['step']} val_loss {val_loss:.5f}",
                    flush=True,
                )
    print(f"stopped at step {state['step']} ({mgr.stop_reason or 'done'})", flush=True)
    return mgr.exit_code


if __name__ == "__main__":
    sys.exit(main())
