"""The Time-LLM reference trainer, checkpointed with ckptkit (public API only).

One call, :func:`train`, runs the whole job: data, model, optimizer, schedule, periodic
validation, checkpoints (trainable weights + optimizer/scheduler/RNG/data position/
EarlyStopping, never the frozen LLM), resume, signals and time limits, metrics/logs/plot
next to the checkpoints, and a final test evaluation of the best checkpoint.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

import ckptkit
from ckptkit import CheckpointManager, EarlyStopping, ResumableDataLoader, RNGState, TrainableOnly
from timellm.data import dataset_for
from timellm.model import TimeLLM, TimeLLMConfig, build_model
from timellm.schedule import build_schedule

# Config fields that may change between resumes without making it another run.
RESUMABLE_CHANGES = frozenset(
    {"max_steps", "train_epochs", "num_workers", "allow_download", "compile", "name"}
)
# Per-preset run defaults (how often to save/evaluate), overridable by options.
RUN_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny-cpu": {"save_steps": 50, "eval_batches": 16, "log_every": 25},
}


@dataclass
class RunOptions:
    """How a training run is stored and resumed (the model/data settings are in
    :class:`timellm.TimeLLMConfig`)."""

    output: str = "runs/timellm-etth1"
    resume: str = "auto"  # latest | auto | never | PATH
    overwrite: bool = False
    force: bool = False
    break_lock: bool = False  # take over the run lock of a writer that is gone
    save_steps: int | None = 200
    save_minutes: float | None = None
    keep_last: int = 3
    time_limit: str | None = None
    eval_every: int | None = None  # steps between validations (default: save_steps)
    eval_batches: int | None = None  # limit validation/test to N evenly spread batches
    log_every: int = 50
    progress: bool | None = None  # tqdm bar; None = only on a terminal
    test: bool = True  # evaluate the best checkpoint on the test split at the end
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("save_steps", "eval_every", "eval_batches"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ckptkit.ConfigError(
                    f"{name.replace('_', '-')} must be a positive integer, got {value!r}"
                )
        if self.keep_last < 1:
            raise ckptkit.ConfigError(f"keep-last must be >= 1, got {self.keep_last}")
        if self.log_every < 1:
            raise ckptkit.ConfigError(f"log-every must be >= 1, got {self.log_every}")


@dataclass
class Distributed:
    """Data-parallel training under ``torchrun`` (gloo on CPU, nccl on GPUs).

    We use torch.distributed directly rather than accelerate: it is what torchrun
    gives every process, and it is testable on CPU (``accelerate launch --cpu``
    silently runs one process). Only the trainable parameters' gradients are averaged.
    Every rank holds the same training state (same seeds, same RNG use, the loader's
    position is global), so rank 0's checkpoint restores every rank exactly.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def from_env(cls) -> Distributed:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        import torch.distributed as dist

        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(
            dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), owns
        )

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if not self.active:
            return
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def mean(self, value: float) -> float:
        if not self.active:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.world_size

    def rank0_says(self, flag: bool) -> bool:
        """Rank 0's decision on every rank (it writes the checkpoints, so it decides
        when to stop; a signal reaching ranks a step apart must not split them)."""
        if not self.active:
            return flag
        import torch.distributed as dist

        t = torch.tensor([int(flag)])
        dist.broadcast(t, src=0)
        return bool(t.item())

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def pick_device(local_rank: int = 0) -> torch.device:
    return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")


class _Eval:
    """Deterministic validation/test: no shuffling, no RNG use, optionally a fixed,
    evenly spread subset of batches (so every variable is represented).

    ``mse``/``mae`` are the means over every window; ``mse_upstream``/``mae_upstream`` are
    upstream ``vali()``'s: the mean of per-batch means over full batches only (its loaders
    drop the last partial batch). Upstream shuffles its validation loader, so which
    windows its dropped batch holds differs run to run; here it is always the last ones."""

    def __init__(self, dataset: Any, batch_size: int, max_batches: int | None) -> None:
        n = len(dataset)
        if max_batches is not None and max_batches * batch_size < n:
            idx = np.linspace(0, n - 1, max_batches * batch_size).round().astype(int)
            dataset = Subset(dataset, idx.tolist())
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)

    @torch.no_grad()
    def __call__(self, model: TimeLLM, device: torch.device, pred_len: int) -> dict[str, float]:
        was_training = model.training
        model.eval()
        se = ae = count = 0.0
        batch_mse: list[float] = []
        batch_mae: list[float] = []
        for x, y, _, _ in self.loader:
            pred = model(x.float().to(device))
            true = y[:, -pred_len:, :].float().to(device)
            se += float(((pred - true) ** 2).sum())
            ae += float((pred - true).abs().sum())
            count += true.numel()
            if len(x) == self.loader.batch_size:
                batch_mse.append(float(torch.nn.functional.mse_loss(pred, true)))
                batch_mae.append(float(torch.nn.functional.l1_loss(pred, true)))
        model.train(was_training)
        nan = float("nan")
        return {
            "mse": se / max(count, 1),
            "mae": ae / max(count, 1),
            "mse_upstream": float(np.average(batch_mse)) if batch_mse else nan,
            "mae_upstream": float(np.average(batch_mae)) if batch_mae else nan,
        }


def run_config(cfg: TimeLLMConfig, fingerprint: str) -> dict[str, Any]:
    """What defines the run for resume checks: model/data/training config + backbone."""
    resumable = RESUMABLE_CHANGES
    if cfg.compat == "upstream":
        # Upstream's schedules are sized by train_epochs (OneCycleLR's total steps): more
        # epochs is another run, not more of this one.
        resumable = resumable - {"train_epochs"}
    out = {k: v for k, v in cfg.to_dict().items() if k not in resumable}
    # Resolved, and new fields only when set: runs saved before they existed still resume.
    out["prompt_domain"] = cfg.domain_prompt
    for name in ("compat", "llm_dim"):
        if out[name] is None:
            del out[name]
    out["backbone"] = fingerprint
    return out


def _loss_plot(history: list[dict[str, Any]], title: str) -> bytes | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train = [(h["step"], h["train_loss"]) for h in history if "train_loss" in h]
    val = [(h["step"], h["val_mse"]) for h in history if "val_mse" in h]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss (MSE)")
    if val:
        ax.plot(*zip(*val, strict=True), marker="o", label="validation MSE")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE (scaled)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


class _Reporter:
    """Plain log lines (they survive ``| tee``), a tqdm bar on terminals, and the same
    lines kept for ``train.log`` next to the checkpoints."""

    def __init__(
        self, echo: Callable[[str], None], total: int, initial: int, progress: bool | None
    ):
        self.echo = echo
        self.lines: list[str] = []
        self.bar = None
        show = sys.stderr.isatty() if progress is None else progress
        if show:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(
                    total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr
                )
            except ImportError:
                self.bar = None

    def line(self, text: str) -> None:
        stamped = f"{time.strftime('%H:%M:%S')} {text}"
        self.lines.append(stamped)
        if self.bar is not None:
            self.bar.write(stamped, file=sys.stdout)
        else:
            self.echo(stamped)

    def advance(self, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(
    cfg: TimeLLMConfig,
    opts: RunOptions,
    *,
    echo: Callable[[str], None] = lambda s: print(s, flush=True),
) -> dict[str, Any]:
    """Train (or resume) a Time-LLM run under ``opts.output``; returns a summary dict
    (``exit_code`` 75 when a signal or the time limit stopped it early: run it again)."""
    dist = Distributed.from_env()
    try:
        return _train(cfg, opts, echo if dist.rank == 0 else (lambda s: None), dist)
    finally:
        dist.close()


def _train(
    cfg: TimeLLMConfig, opts: RunOptions, echo: Callable[[str], None], dist: Distributed
) -> dict[str, Any]:
    if cfg.compat == "upstream" and opts.eval_every is not None:
        raise ckptkit.ConfigError(
            "eval_every (--eval-every) does not apply with compat='upstream': validation runs "
            "once per epoch, as upstream's; drop it"
        )
    device = pick_device(dist.local_rank)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    import random

    random.seed(cfg.seed)

    train_set, val_set, test_set = (dataset_for(cfg, split) for split in ("train", "val", "test"))
    loader = ResumableDataLoader(
        train_set,
        batch_size=cfg.batch_size,
        shuffle=True,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        drop_last=True,
        rank=dist.rank,
        world_size=dist.world_size,
    )
    if len(loader) == 0:
        raise ckptkit.ConfigError(
            f"{cfg.data}: fewer training windows than one batch of {cfg.batch_size}; "
            "lower --batch-size or --seq-len"
        )
    if cfg.compat == "upstream":
        for split, data in (("validation", val_set), ("test", test_set)):
            if len(data) < cfg.batch_size:
                # Upstream's drop_last loader would have no batch: its loss would be NaN.
                raise ckptkit.ConfigError(
                    f"{cfg.data}: the {split} split has {len(data)} windows, fewer than one "
                    f"batch of {cfg.batch_size} (upstream drops partial batches); lower "
                    "--batch-size or --seq-len"
                )
    steps_per_epoch = len(loader)
    total_steps = cfg.train_epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    model = build_model(cfg)
    _to_device(model, device, quantized=cfg.quantize is not None)
    params = model.trainable_parameters()
    opt = torch.optim.Adam(params, lr=cfg.learning_rate, **_fast_optimizer_kwargs(device))
    sched = build_schedule(opt, cfg, steps_per_epoch, total_steps)
    compat = cfg.compat == "upstream"
    scaler = torch.amp.GradScaler(
        device.type, enabled=cfg.dtype == "fp16" and device.type == "cuda"
    )
    # Upstream counts an equal validation loss as an improvement (and saves it as best).
    early = EarlyStopping(patience=cfg.patience, mode="min", tie_improves=compat)
    fingerprint = str(model.backbone_fingerprint()["digest"])
    # Upstream validates once per epoch (eval_every None: at epoch ends only).
    eval_every = None if compat else (opts.eval_every or opts.save_steps)
    validate = _Eval(val_set, cfg.batch_size, opts.eval_batches)

    state: dict[str, Any] = {
        # Trainable tensors + frozen fingerprint; reads the old flat TrainableState too.
        "model": TrainableOnly(model),
        "optimizer": opt,
        "scheduler": sched,
        "scaler": scaler,
        "loader": loader,
        "rng": RNGState(),
        "early_stopping": early,
        "step": 0,
        "epoch": 0,
        "history": [],
        "loss_window": [],
        "backbone": fingerprint,
        # What predict needs to scale new data like the training data.
        "data_scaler": {**train_set.scaler.state_dict(), "columns": list(train_set.columns)},
    }
    mgr = CheckpointManager(
        opts.output,
        keep_last=opts.keep_last,
        keep_best=1,
        # Under compat the best is the newest checkpoint the EarlyStopping marked best, so
        # a tie makes the newer one best, as upstream's EarlyStopping saves it.
        best_metric=None if compat else "val_mse",
        mode="min",
        save_every_steps=opts.save_steps,
        save_every_minutes=opts.save_minutes,
        handle_signals=True,
        time_limit=opts.time_limit,
        config=run_config(cfg, fingerprint),
        metadata={"trainer": "timellm", "preset": cfg.name, "time_llm_config": cfg.to_dict()},
        break_lock=opts.break_lock,
    )
    report: _Reporter | None = None
    try:
        if opts.resume in ("latest", "auto") and (latest := mgr.latest(verify=False)) is not None:
            # Before the config check, whose "pass --force" would not help here.
            _check_backbone(latest.manifest.config or {}, cfg, fingerprint, latest.url)
        elif opts.resume not in ("latest", "auto", "never"):
            # A checkpoint path: name another LLM before TrainableOnly refuses its weights.
            saved: dict[str, Any] = {}
            with suppress(ckptkit.CkptError):  # unreadable: mgr.resume says why
                saved = ckptkit.inspect(opts.resume).get("config") or {}
            _check_backbone(saved, cfg, fingerprint, opts.resume)
        restored = mgr.resume(state, opts.resume, overwrite=opts.overwrite, force=opts.force)
        source = mgr.restored_from.url if mgr.restored_from is not None else opts.resume
        _check_backbone({"backbone": state["backbone"]}, cfg, fingerprint, source)
        step, epoch = int(state["step"]), int(state["epoch"])
        history: list[dict[str, Any]] = state["history"]
        # Losses since the last log record: part of the state, so a resume between two
        # records averages over the same steps as an uninterrupted run.
        window: list[float] = state["loss_window"]
        old_log = mgr.read_file("train.log")
        report = _Reporter(echo, total_steps, step, opts.progress if dist.rank == 0 else False)
        if old_log and restored.resumed:  # a fresh start begins a fresh log
            report.lines = old_log.decode(errors="replace").splitlines()
        report.line(
            f"run {mgr.run_name}: {'resumed at step ' + str(restored) if restored.resumed else 'fresh start'}"
            f" | {cfg.name} {cfg.data} {cfg.seq_len}->{cfg.pred_len} | {device.type} {cfg.dtype}"
            f" | {steps_per_epoch} steps/epoch, {total_steps} steps | {sum(p.numel() for p in params):,} trainable"
        )

        def persist() -> None:
            mgr.write_file("metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
            mgr.write_file("train.log", "\n".join(report.lines) + "\n")

        t_window = time.perf_counter()
        model.train()
        stopping = False
        while (
            step < total_steps
            and epoch < cfg.train_epochs
            and not stopping
            and not early.should_stop
        ):
            loader.set_epoch(epoch)
            for x, y, _, _ in loader:
                lr = opt.param_groups[0]["lr"]  # the lr this step uses
                loss = _train_step(model, opt, scaler, x, y, cfg.pred_len, device, dist)
                sched.after_step()
                step += 1
                state["step"] = step
                window.append(loss)
                report.advance(loss)
                record: dict[str, Any] | None = None
                if step % opts.log_every == 0 or step == total_steps:
                    elapsed = time.perf_counter() - t_window
                    record = {
                        "step": step,
                        "epoch": epoch,
                        "train_loss": float(np.mean(window)),
                        "lr": lr,
                        "samples_per_s": len(window) * cfg.batch_size / max(elapsed, 1e-9),
                    }
                    window.clear()
                    t_window = time.perf_counter()
                metrics: dict[str, float] = {}
                if eval_every and (step % eval_every == 0 or step == total_steps):
                    metrics = _validate(validate, model, device, cfg, early, step, report)
                    record = {**(record or {"step": step, "epoch": epoch}), **metrics}
                if record is not None:
                    history.append(record)
                    if "train_loss" in record:
                        report.line(_format_record(record, total_steps))
                if mgr.maybe_save(step, state, metrics=metrics or None, epoch=epoch):
                    persist()
                stopping = dist.rank0_says(mgr.should_stop)
                # Under compat an epoch's last step still ends the epoch (validation).
                epoch_ends = compat and step % steps_per_epoch == 0
                if (step >= total_steps and not epoch_ends) or stopping or early.should_stop:
                    break
            else:
                # Also reached when resuming from a checkpoint taken at the epoch's last
                # batch: nothing is left to iterate, and the epoch end happens here.
                epoch += 1
                state["epoch"] = epoch
                if eval_every:
                    metrics = _val_metrics_at(history, step)
                else:
                    metrics = _validate(validate, model, device, cfg, early, step, report)
                    history.append({"step": step, "epoch": epoch, **metrics})
                # Upstream adjusts the lr after validating, and not at all once it stops early.
                if not (compat and early.should_stop):
                    sched.after_epoch()
                mgr.maybe_save(step, state, metrics=metrics or None, epoch=epoch, epoch_end=True)
                persist()
                stopping = dist.rank0_says(mgr.should_stop)
        if early.should_stop and not stopping:
            what = "epochs" if compat else "validations"
            report.line(f"early stopping: no improvement for {early.patience} {what}")
        summary: dict[str, Any] = {
            "run": opts.output,
            "run_name": mgr.run_name,
            "step": step,
            "stopped": mgr.stop_reason,
            "exit_code": ckptkit.EXIT_RESUMABLE if stopping else 0,
        }
        if stopping:
            report.line(
                f"stopped at step {step} ({mgr.stop_reason}): checkpoint saved; run again with --resume latest"
            )
        else:
            latest = mgr.latest()
            if latest is None or latest.step != step:
                mgr.save(step, state, metrics=_val_metrics_at(history, step) or None, epoch=epoch)
            if opts.test:
                summary.update(
                    _final_test(mgr, state, model, device, cfg, test_set, opts, report, history)
                )
            best = "none" if early.best is None else f"{early.best:.4f}"
            report.line(f"done: step {step}, best val_mse {best}")
        persist()
        plot = _loss_plot(history, f"Time-LLM {cfg.name} on {cfg.data} ({mgr.run_name})")
        if plot is not None:
            mgr.write_file("loss.png", plot)
        summary["best_val_mse"] = early.best
        mgr.write_file("summary.json", json.dumps(summary, indent=1))
        return summary
    finally:
        if report is not None:
            report.close()
        mgr.close()


def _train_step(
    model: TimeLLM,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    x: torch.Tensor,
    y: torch.Tensor,
    pred_len: int,
    device: torch.device,
    dist: Distributed,
) -> float:
    x = x.float().to(device, non_blocking=True)
    y = y[:, -pred_len:, :].float().to(device, non_blocking=True)
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    dist.average_gradients(model.trainable_parameters())
    scaler.step(opt)
    scaler.update()
    value = dist.mean(float(loss.detach()))
    if not math.isfinite(value):
        raise ckptkit.CkptError(
            f"training diverged (loss {value}); lower --learning-rate or use --dtype fp32/bf16"
        )
    return value


def _validate(
    validate: _Eval,
    model: TimeLLM,
    device: torch.device,
    cfg: TimeLLMConfig,
    early: EarlyStopping,
    step: int,
    report: _Reporter,
) -> dict[str, float]:
    m = validate(model, device, cfg.pred_len)
    if cfg.compat != "upstream":
        best = early.step(m["mse"], step)
        mark = " (best)" if best else ""
        report.line(f"step {step}: val_mse {m['mse']:.4f} val_mae {m['mae']:.4f}{mark}")
        return {"val_mse": m["mse"], "val_mae": m["mae"]}
    # Upstream decides on its own vali loss (per-batch mean); ours is reported next to it.
    best = early.step(m["mse_upstream"], step)
    report.line(
        f"step {step}: val_mse {m['mse']:.4f} val_mae {m['mae']:.4f} | upstream's average: "
        f"val_mse {m['mse_upstream']:.4f} val_mae {m['mae_upstream']:.4f}"
        f"{' (best)' if best else ''} | early stopping {early.counter}/{early.patience}"
    )
    return {
        "val_mse": m["mse"],
        "val_mae": m["mae"],
        "val_mse_upstream": m["mse_upstream"],
        "val_mae_upstream": m["mae_upstream"],
    }


def _val_metrics_at(history: list[dict[str, Any]], step: int) -> dict[str, float]:
    """The validation metrics recorded at ``step`` (from the history, which a resume
    restores), or nothing: a checkpoint is ranked only by metrics measured on its weights."""
    for record in reversed(history):
        if record["step"] == step and "val_mse" in record:
            return {k: v for k, v in record.items() if k.startswith("val_")}
    return {}


def _check_backbone(
    saved: dict[str, Any], cfg: TimeLLMConfig, fingerprint: str, source: str
) -> None:
    """Refuse trainable weights learnt on another frozen LLM (``saved``: a run config or
    ``{"backbone": digest}``)."""
    theirs = saved.get("backbone")
    if theirs in (None, fingerprint):
        return
    was = f"{saved['llm']}, {saved['llm_layers']} layers, " if "llm" in saved else ""
    raise ckptkit.IncompatibleCheckpointError(
        f"{source} was trained on another frozen LLM ({was}backbone {theirs[:12]}) than "
        f"this run's ({cfg.llm}, {cfg.llm_layers} layers, backbone {fingerprint[:12]}): "
        "resume with the same --llm/--llm-layers, or train into a new --output"
    )


def _format_record(r: dict[str, Any], total: int) -> str:
    return (
        f"step {r['step']}/{total} epoch {r['epoch']} loss {r['train_loss']:.4f} "
        f"lr {r['lr']:.2e} {r['samples_per_s']:.0f} samples/s"
    )


def _final_test(
    mgr: CheckpointManager,
    state: dict[str, Any],
    model: TimeLLM,
    device: torch.device,
    cfg: TimeLLMConfig,
    test_set: Any,
    opts: RunOptions,
    report: _Reporter,
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    """Reload the best checkpoint's weights (upstream never does) and evaluate on test."""
    best = mgr.best()
    if best is not None:
        # force: the run's own checkpoint, possibly from before a --force resume.
        mgr.restore({"model": state["model"]}, best.name, force=True)
    m = _Eval(test_set, cfg.batch_size, opts.eval_batches)(model, device, cfg.pred_len)
    where = f"best checkpoint (step {best.step})" if best is not None else "final weights"
    result = {"test_mse": m["mse"], "test_mae": m["mae"]}
    line = f"test on {where}: mse {m['mse']:.4f} mae {m['mae']:.4f}"
    if cfg.compat == "upstream":
        result.update(test_mse_upstream=m["mse_upstream"], test_mae_upstream=m["mae_upstream"])
        line += f" | upstream's average: mse {m['mse_upstream']:.4f} mae {m['mae_upstream']:.4f}"
    report.line(line)
    test_from = best.step if best else state["step"]
    history.append(
        {"step": state["step"], "epoch": state["epoch"], **result, "test_from_step": test_from}
    )
    return {**result, "best_step": best.step if best else None}


def _to_device(model: TimeLLM, device: torch.device, quantized: bool) -> None:
    for name, child in model.named_children():
        if name != "llm_model" or not quantized:  # bitsandbytes placed the 4/8-bit LLM already
            child.to(device)


def _fast_optimizer_kwargs(device: torch.device) -> dict[str, Any]:
    # fused Adam on CUDA, multi-tensor (foreach) elsewhere: same math, fewer kernel launches.
    return {"fused": True} if device.type == "cuda" else {"foreach": True}
