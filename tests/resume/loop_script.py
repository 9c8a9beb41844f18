"""A realistic training loop that the resume tests run as a real process.

    python tests/resume/loop_script.py --run RUN --out final.pt [--schedule onecycle|epoch]

Every source of state a resumed run needs is here: a Dropout model (torch RNG), NumPy and
Python draws in the loop, a shuffled ``ResumableDataLoader`` with 2 worker processes and a
random augmentation, AdamW, a per-step OneCycleLR or a per-epoch StepLR, 2 micro-batches
of gradient accumulation per optimizer step, validation at each epoch end feeding
``EarlyStopping`` and ``best_metric``, a CPU ``GradScaler`` under bfloat16 autocast, and
``RNGState()``.

Accumulation: checkpoints are taken only at optimizer-step boundaries, where no gradient
is pending, so there is no accumulation counter to save; an epoch whose batch count is not
a multiple of ``--accum`` ends with a shorter group (its loss is averaged over the
micro-batches it has), exactly as in an uninterrupted run.

The per-step log (one line per optimizer step: step, learning rate, loss, scale) lives in
the checkpoint state, so after a kill it is exactly the log up to the restored step.

Markers on stdout say where the process is: ``FRESH`` / ``RESUMED n``, ``MICRO n`` (a
micro-batch of step n done, the step not yet), ``STEP n`` (optimizer step n done, before its
possible save), ``SAVING <key>`` (about to write a file of a checkpoint commit), ``SAVED n``,
``VALIDATING e``, ``DONE`` and ``EXIT <code> <seconds since the manager was created>``.
``--hold MARKER:N`` (repeatable) pauses the process right after its N-th MARKER line until
a signal arrives, so a test can SIGKILL it, or SIGTERM it, at exactly that point.

When the run finishes it writes the final model, optimizer, scheduler, scaler,
EarlyStopping state and the log to ``--out`` and exits 0; stopped by a signal or the time
limit it exits 75.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ckptkit import CheckpointManager, EarlyStopping, ResumableDataLoader, RNGState

FEATURES = 12
TRAIN, VALID, BATCH = 200, 64, 16  # 13 micro-batches per epoch: 6 full groups + 1 short one


class NoisyRegression(Dataset):
    """A fixed synthetic regression set with a random augmentation per item, drawn from the
    global torch and NumPy RNGs (which ResumableDataLoader seeds per batch)."""

    def __init__(self, n: int, seed: int, augment: bool) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, FEATURES, generator=g)
        w = torch.randn(FEATURES, 1, generator=g)
        self.y = torch.sin(self.x @ w) + 0.1 * torch.randn(n, 1, generator=g)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[i]
        if self.augment:
            x = x * float(np.random.uniform(0.9, 1.1)) + 0.05 * torch.randn(FEATURES)
        return x, self.y[i]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run directory (checkpoints)")
    p.add_argument("--out", required=True, help="final state, written when the run finishes")
    p.add_argument("--resume", default="auto", help="latest | auto | never | PATH")
    p.add_argument("--schedule", choices=("onecycle", "epoch"), default="onecycle")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--save-every", type=int, default=4, help="checkpoint every N steps")
    p.add_argument("--time-limit", default=None, help="e.g. 3s, 1h55m")
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no autocast/GradScaler")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds per optimizer step")
    p.add_argument(
        "--hold", action="append", default=[], help="MARKER:N: wait for a signal after that line"
    )
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Everything a fresh run starts from; identical in every process for the same args."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    loader = ResumableDataLoader(
        NoisyRegression(TRAIN, args.seed, augment=True),
        batch_size=BATCH,
        shuffle=True,
        seed=args.seed,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    steps_per_epoch = -(-len(loader) // args.accum)
    if args.schedule == "onecycle":
        sched: Any = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=1e-2, total_steps=steps_per_epoch * args.epochs
        )
    else:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    # growth_interval=3 so the scale really moves during the run and must be restored.
    scaler = torch.amp.GradScaler("cpu", growth_interval=3, enabled=args.amp)
    return {
        "model": model,
        "optimizer": opt,
        "scheduler": sched,
        "scaler": scaler,
        "loader": loader,
        "early_stopping": EarlyStopping(patience=args.patience, delta=1e-3),
        "rng": RNGState(),
        "step": 0,
        "epoch": 0,
        "log": [],
    }


class Markers:
    """Prints progress markers; for each ``"MARKER:N"`` in ``holds`` the process waits for
    a signal right after its N-th MARKER line (a test kills or signals it there)."""

    def __init__(self, holds: list[str]) -> None:
        self.holds = {(m, int(n)) for m, _, n in (h.partition(":") for h in holds)}
        self.seen: Counter[str] = Counter()

    STOPS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGUSR1})

    def __call__(self, line: str) -> None:
        marker = line.split(" ", 1)[0]
        self.seen[marker] += 1
        if (marker, self.seen[marker]) not in self.holds:
            print(line, flush=True)
            return
        # Notice stop signals from before the line is announced (no race with the test),
        # whichever thread the kernel hands them to; the real handler runs at once.
        fired: list[int] = []
        real = {sig: signal.getsignal(sig) for sig in self.STOPS}

        def relay(signum: int, frame: Any) -> None:
            fired.append(signum)
            handler = real[signum]
            if callable(handler):
                handler(signum, frame)

        for sig in self.STOPS:
            signal.signal(sig, relay)
        try:
            print(line, flush=True)
            while not fired:  # SIGKILL never returns
                time.sleep(0.005)
        finally:
            for sig, handler in real.items():
                signal.signal(sig, handler)


def mark_commits(mgr: CheckpointManager, mark: Markers) -> None:
    """Announce every file of a checkpoint commit before it is written, so a test can stop
    the process in the middle of a commit."""
    write: Callable[[str, bytes], None] = mgr.storage.write_bytes

    def write_marked(key: str, data: bytes) -> None:
        if key.startswith(".tmp-"):  # the rename strategy's not-yet-visible checkpoint
            mark(f"SAVING {key}")
        write(key, data)

    mgr.storage.write_bytes = write_marked  # type: ignore[method-assign]
    stream = mgr.storage.write_stream

    def stream_marked(key: str, chunks: Any, size: int | None = None) -> None:
        if key.startswith(".tmp-"):  # tensor files and state.json are streamed
            mark(f"SAVING {key}")
        stream(key, chunks, size)

    mgr.storage.write_stream = stream_marked  # type: ignore[method-assign]


def validate(model: nn.Module, valid: NoisyRegression) -> float:
    model.eval()
    with torch.no_grad():
        loss = nn.functional.mse_loss(model(valid.x), valid.y).item()
    model.train()
    return loss


def train(
    args: argparse.Namespace, mgr: CheckpointManager, state: dict[str, Any], mark: Markers
) -> None:
    model, opt, sched = state["model"], state["optimizer"], state["scheduler"]
    scaler, loader, stopper = state["scaler"], state["loader"], state["early_stopping"]
    valid = NoisyRegression(VALID, args.seed + 1, augment=False)
    n_batches = len(loader)
    while state["epoch"] < args.epochs and not stopper.should_stop:
        loader.set_epoch(state["epoch"])
        position = loader.state_dict()["batches_yielded"]  # > 0 when resuming mid-epoch
        micro, group_loss = 0, 0.0
        for x, y in loader:
            group = min(args.accum, n_batches - (position - micro))  # micro-batches in this group
            position, micro = position + 1, micro + 1
            # The main process draws from all three global RNGs, like real loops do.
            x = x + 0.01 * torch.from_numpy(np.random.standard_normal(x.shape)).float()
            y = y * (1.0 + 0.01 * random.gauss(0.0, 1.0))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp):
                loss = nn.functional.mse_loss(model(x).float(), y) / group
            scaler.scale(loss).backward()
            group_loss += loss.item()
            if micro < group:
                mark(f"MICRO {state['step'] + 1}")
                continue
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if args.schedule == "onecycle":
                sched.step()
            state["step"] += 1
            step = state["step"]
            lr = opt.param_groups[0]["lr"]
            state["log"].append(f"{step} {lr!r} {group_loss!r} {scaler.get_scale()!r}")
            mark(f"STEP {step}")
            time.sleep(args.step_sleep)
            if mgr.maybe_save(step, state, metrics={"loss": group_loss}):
                mark(f"SAVED {step}")
            micro, group_loss = 0, 0.0
            if mgr.should_stop:
                return
        # The epoch is complete (resuming at its end yields no batch and lands here).
        mark(f"VALIDATING {state['epoch']}")
        val_loss = validate(model, valid)
        stopper.step(val_loss, state["step"])
        if args.schedule == "epoch":
            sched.step()
        state["epoch"] += 1
        state["log"].append(f"epoch {state['epoch']} val {val_loss!r}")
        if mgr.maybe_save(state["step"], state, {"val_loss": val_loss}, epoch_end=True):
            mark(f"SAVED {state['step']}")
        if mgr.should_stop:
            return


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mark = Markers(args.hold)
    state = build(args)
    started = time.monotonic()
    mgr = CheckpointManager(
        args.run,
        keep_last=2,
        keep_best=1,
        best_metric="val_loss",
        save_every_steps=args.save_every,
        handle_signals=True,
        time_limit=args.time_limit,
        config={"schedule": args.schedule, "accum": args.accum, "epochs": args.epochs},
    )
    mark_commits(mgr, mark)
    with mgr:
        restored = mgr.resume(state, args.resume)
        mark(f"RESUMED {restored}" if restored.resumed else "FRESH")
        train(args, mgr, state, mark)
        if not mgr.should_stop:
            final = {
                k: state[k].state_dict()
                for k in ("model", "optimizer", "scheduler", "scaler", "early_stopping")
            }
            torch.save({**final, "log": state["log"], "step": state["step"]}, args.out)
            mark("DONE")
    mark(f"EXIT {mgr.exit_code} {time.monotonic() - started:.3f}")
    return mgr.exit_code


if __name__ == "__main__":
    sys.exit(main())
