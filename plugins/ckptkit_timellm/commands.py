"""`ckptkit train` and `ckptkit predict`: thin click wrappers over ``timellm``."""

from __future__ import annotations

from typing import Any

import click

from ckptkit import ConfigError, MissingDependencyError


def _timellm() -> Any:
    try:
        import timellm.predict
        import timellm.train
    except ImportError as exc:
        raise MissingDependencyError(
            f"the Time-LLM trainer needs {exc.name or 'its extras'}: pip install 'ckptkit[timellm]'"
        ) from exc
    return timellm


PRESET_HELP = "Named configuration: tiny-cpu (default; offline tiny LLM on CPU), gpt2-etth1, llama3-8b-4bit-etth1."


@click.command("train")
@click.option("--preset", default="tiny-cpu", show_default=True, help=PRESET_HELP)
@click.option(
    "--data",
    help="ETTh1 or ETTh2 (bundled), ETTm1/ETTm2 by path, or PATH.csv with a 'date' column.",
)
@click.option(
    "--llm",
    help="Backbone: tiny-gpt2 (offline), gpt2, llama, bert, a HF model id in the local cache, or a local PATH.",
)
@click.option(
    "--llm-layers", type=int, help="Keep only the first N transformer layers of the frozen LLM."
)
@click.option("--seq-len", type=int, help="Input window length (time steps the model sees).")
@click.option(
    "--label-len",
    type=int,
    help="Known steps at the start of each target window (upstream's --label_len; at most --seq-len).",
)
@click.option("--pred-len", type=int, help="Forecast horizon (time steps predicted).")
@click.option("--batch-size", type=int, help="Training batch size (first knob when out of memory).")
@click.option("--learning-rate", type=float, help="Peak learning rate of the Adam optimizer.")
@click.option("--epochs", type=int, help="Number of training epochs.")
@click.option(
    "--max-steps", type=int, help="Stop after this many optimizer steps (whatever --epochs says)."
)
@click.option(
    "--output",
    default=None,
    help="Run URL for checkpoints, logs, metrics and plot: a path, gs://bucket/dir, drive://dir, ... [default: runs/<preset>-<data>]",
)
@click.option(
    "--resume",
    default="auto",
    show_default=True,
    help="latest: newest valid checkpoint (error if none); auto: latest if any, else fresh; "
    "never: start fresh (refuses a run with checkpoints unless --overwrite); PATH: a checkpoint or run, native or legacy.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="With --resume never: delete the run's existing checkpoints and start fresh.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Resume even though the training config, or the optimizer/scheduler class, differs "
    "from the checkpoint's (shapes are always checked).",
)
@click.option(
    "--break-lock",
    is_flag=True,
    help="Take over the run lock of a writer that is gone (a lost VM's lock goes stale "
    "only after 2 minutes); never while that writer still runs.",
)
@click.option(
    "--save-steps",
    type=int,
    help="Save a checkpoint every N steps (validation runs at the same steps).",
)
@click.option("--save-minutes", type=float, help="Also save every M minutes of wall time.")
@click.option(
    "--keep-last",
    type=int,
    default=3,
    show_default=True,
    help="Keep the N newest checkpoints (the best is always kept too).",
)
@click.option(
    "--time-limit",
    help="Save and exit (code 75) before this much wall time, e.g. 1h55m for a 2-hour SLURM job.",
)
@click.option(
    "--eval-every", type=int, help="Validate every N steps [default: at every --save-steps]."
)
@click.option(
    "--eval-batches",
    type=int,
    help="Validate/test on N evenly spread batches instead of the whole split.",
)
@click.option("--log-every", type=int, help="Print a log line every N steps.")
@click.option(
    "--dtype",
    type=click.Choice(["bf16", "fp16", "fp32"]),
    help="Compute dtype of the frozen LLM (bf16 needs a recent GPU; fp16 uses a GradScaler).",
)
@click.option(
    "--quantize",
    type=click.Choice(["4bit", "8bit", "none"]),
    help="Load the frozen LLM with bitsandbytes in 4/8 bit (CUDA only).",
)
@click.option("--num-workers", type=int, help="DataLoader worker processes.")
@click.option("--seed", type=int, help="Random seed (data order, initialization, dropout).")
@click.option(
    "--no-test", is_flag=True, help="Skip the final test evaluation of the best checkpoint."
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show a progress bar [default: only on a terminal].",
)
def train_cmd(**kw: Any) -> None:
    """Train Time-LLM (a frozen LLM reprogrammed for forecasting) on ETT or a CSV,
    with checkpoints that survive interruption.

    Kill it, lose the VM, hit the time limit: run the same command again and it resumes
    exactly (--resume auto). Exit code 75 means it stopped early on purpose (SIGTERM,
    SIGUSR1, Ctrl+C or --time-limit) after saving; run it again to continue.
    """
    tl = _timellm()
    preset = kw.pop("preset")
    overrides = {
        "data": kw.pop("data"), "llm": kw.pop("llm"), "llm_layers": kw.pop("llm_layers"),
        "seq_len": kw.pop("seq_len"), "label_len": kw.pop("label_len"), "pred_len": kw.pop("pred_len"),
        "batch_size": kw.pop("batch_size"), "learning_rate": kw.pop("learning_rate"), "train_epochs": kw.pop("epochs"),
        "max_steps": kw.pop("max_steps"), "dtype": kw.pop("dtype"), "num_workers": kw.pop("num_workers"),
        "seed": kw.pop("seed"),
    }  # fmt: skip
    quantize = kw.pop("quantize")
    if quantize is not None:
        overrides["quantize"] = None if quantize == "none" else quantize
    cfg = tl.get_preset(preset, **{k: v for k, v in overrides.items() if v is not None})
    run = dict(tl.train.RUN_DEFAULTS.get(preset, {}))
    run.update({k: v for k, v in kw.items() if v is not None})
    run["test"] = not run.pop("no_test", False)
    if run.get("output") is None:
        run["output"] = f"runs/{preset}-{cfg.data.rsplit('/', 1)[-1].removesuffix('.csv')}"
    opts = tl.train.RunOptions(**run)
    summary = tl.train.train(cfg, opts, echo=click.echo)
    if summary["exit_code"]:
        raise click.exceptions.Exit(summary["exit_code"])


@click.command("predict")
@click.option(
    "--checkpoint",
    required=True,
    help="A run (its best checkpoint, see --which) or one checkpoint: path or URL.",
)
@click.option(
    "--data",
    required=True,
    help="ETTh1/ETTh2 or a CSV with a 'date' column and the training columns; the forecast starts after its last row.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, writable=True),
    help="Where to write the forecast CSV (date + one column per variable).",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, writable=True),
    help="Also write a PNG of history and forecast.",
)
@click.option(
    "--which", default="best", show_default=True, help="For a run: best, latest, or a step number."
)
def predict_cmd(checkpoint: str, data: str, out: str, plot: str | None, which: str) -> None:
    """Forecast the next pred_len steps after the end of --data with a trained checkpoint."""
    tl = _timellm()
    if which not in ("best", "latest") and not which.isdigit():
        raise ConfigError(f"--which must be best, latest or a step number, got {which!r}")
    result = tl.predict.predict(checkpoint, data, out, plot=plot, which=which)
    click.echo(
        f"wrote {len(result)} forecast rows x {result.shape[1] - 1} variables to {out}"
        + (f" and {plot}" if plot else "")
    )
