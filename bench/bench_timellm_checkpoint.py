"""What checkpointing costs the Time-LLM trainer, as a share of training time.

1. tiny-cpu, the real trainer (``timellm.train.train``) for 200 steps at the preset's
   default save interval: time inside ``CheckpointManager.save`` vs the whole run.
2. GPT-2-small shape (random weights, vocab 50257: the ~51 M trainable parameters of
   upstream's GPT-2 setup): one save of the full training state vs training steps,
   projected to the default interval of ``RunOptions.save_steps``.

Run ``python -m bench.bench_timellm_checkpoint``; writes bench/results/timellm_checkpoint.md.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ckptkit import CheckpointManager, EarlyStopping, RNGState

RESULTS = Path(__file__).parent / "results" / "timellm_checkpoint.md"


class SaveTimer:
    """Wraps CheckpointManager.save for the duration of a run (bench-only)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._orig = CheckpointManager.save

    def __enter__(self) -> SaveTimer:
        timer, orig = self, self._orig

        def timed(mgr, *args, **kwargs):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            try:
                return orig(mgr, *args, **kwargs)
            finally:
                timer.times.append(time.perf_counter() - t)

        CheckpointManager.save = timed  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        CheckpointManager.save = self._orig  # type: ignore[method-assign]


def tiny_real_run(steps: int = 200) -> list[str]:
    from timellm import get_preset
    from timellm.train import RUN_DEFAULTS, RunOptions, train

    defaults = RUN_DEFAULTS["tiny-cpu"]
    cfg = get_preset("tiny-cpu", max_steps=steps)
    with tempfile.TemporaryDirectory() as tmp, SaveTimer() as timer:
        opts = RunOptions(
            output=os.path.join(tmp, "run"), resume="never", progress=False, test=False, **defaults
        )
        started = time.perf_counter()
        train(cfg, opts, echo=lambda s: None)
        total = time.perf_counter() - started
    saved = sum(timer.times)
    return [
        "### tiny-cpu, real trainer",
        "",
        f"{steps} steps, save every {defaults['save_steps']} steps (the preset's default), "
        f"validation on {defaults['eval_batches']} batches at each save.",
        "",
        "| saves | time in save | whole run | checkpoint share |",
        "|---:|---:|---:|---:|",
        f"| {len(timer.times)} | {saved:.2f} s (median {statistics.median(timer.times) * 1e3:.0f} ms) "
        f"| {total:.1f} s | **{100 * saved / total:.2f} %** |",
        "",
    ]


def gpt2_projection(steps: int = 2) -> list[str]:
    from bench.bench_timellm_step import gpt2_shaped
    from timellm import get_preset
    from timellm.train import RunOptions

    cfg = get_preset(
        "gpt2-etth1", llm="random-gpt2-shape", dtype="fp32", seq_len=96, pred_len=24, batch_size=2
    )
    model = gpt2_shaped(cfg)
    params = model.trainable_parameters()
    opt = torch.optim.Adam(params, lr=cfg.learning_rate, foreach=True)
    x = torch.randn(cfg.batch_size, cfg.seq_len, 7)
    y = torch.randn(cfg.batch_size, cfg.pred_len, 7)
    step_times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        step_times.append(time.perf_counter() - t)
    step = statistics.median(step_times[1:])
    state = {
        "model": model.trainable_state(),
        "optimizer": opt,
        "rng": RNGState(),
        "early_stopping": EarlyStopping(),
        "step": 1,
    }
    with tempfile.TemporaryDirectory() as tmp:
        mgr = CheckpointManager(os.path.join(tmp, "run"), keep_last=2)
        saves = []
        for i in range(3):
            t = time.perf_counter()
            info = mgr.save(i + 1, state)
            saves.append(time.perf_counter() - t)
        size = info.size if info else 0
        mgr.close()
    save = statistics.median(saves)
    interval = RunOptions().save_steps or 1
    trainable = sum(p.numel() for p in params)
    return [
        "### GPT-2-small shape (random weights), projected",
        "",
        f"{trainable / 1e6:.1f} M trainable parameters; checkpoint {size / 2**20:.0f} MB "
        "(trainable weights + Adam moments + RNG/EarlyStopping; the frozen LLM is never saved).",
        "",
        "| train step (median) | save (median of 3) | default save interval | checkpoint share |",
        "|---:|---:|---:|---:|",
        f"| {step:.2f} s | {save:.2f} s | {interval} steps | **{100 * save / (save + interval * step):.2f} %** |",
        "",
    ]


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    sections = tiny_real_run() + gpt2_projection()
    header = [
        "# Checkpoint cost in the Time-LLM trainer",
        "",
        f"`python -m bench.bench_timellm_checkpoint` on {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}, local disk (rename commit, fsync); whole run "
        f"{time.perf_counter() - started:.0f} s. Target: under 1 % of training time.",
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(header + sections))
    print(RESULTS.read_text())


if __name__ == "__main__":
    main()
