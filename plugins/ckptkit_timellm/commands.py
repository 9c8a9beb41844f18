"""`ckptkit train` and `ckptkit predict`: thin click wrappers over ``timellm``."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import click

from ckptkit import ConfigError, MissingDependencyError
from ckptkit_timellm.upstream import UPSTREAM_IGNORED, resolve_data, upstream_notes


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


# The click parameters that are TimeLLMConfig fields of the same name.
_CONFIG_OPTIONS = (
    "compat", "data", "llm", "llm_layers", "llm_dim", "seq_len", "label_len", "pred_len",
    "features", "target", "freq", "percent", "d_model", "d_ff", "n_heads", "dropout",
    "patch_len", "stride", "description", "batch_size", "learning_rate", "train_epochs",
    "max_steps", "patience", "lradj", "pct_start", "dtype", "num_workers", "seed", "prompt_domain",
)  # fmt: skip

TRAIN_EPILOG = (
    "Upstream's spellings (run_main.py of KimMeen/Time-LLM) are aliases of the options above "
    "(--seq_len, --learning_rate, --llm_model, ...), so an argument list from upstream's "
    "scripts/*.sh can be pasted; a later option overrides an earlier one, as with "
    "upstream's argparse. Accepted and ignored, with a note: "
    + ", ".join(f"--{name}" for name in sorted(UPSTREAM_IGNORED) if name != "output_attention")
    + " (bookkeeping, or read only by other upstream models). Refused: --output_attention, "
    "--task_name other than long_term_forecast, --model other than TimeLLM, --itr above 1. "
    "They do not switch on upstream's training semantics: add --compat upstream for those."
)


@click.command(
    "train",
    epilog=TRAIN_EPILOG,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.option("--preset", default="tiny-cpu", show_default=True, help=PRESET_HELP)
@click.option(
    "--compat",
    type=click.Choice(["upstream", "none"]),
    help="upstream: upstream run_main.py's training semantics step for step (lr schedules "
    "with OneCycleLR's /25, validation and early stopping once per epoch with ties counting "
    "as improvements, upstream's prompt defaults); none: ckptkit's [default: none]. "
    "--max-steps then only cuts the run short (the schedule stays sized by --epochs), and "
    "a preset's step cap and --eval-batches defaults do not apply.",
)
@click.option(
    "--data",
    help="ETTh1 or ETTh2 (bundled), ETTm1/ETTm2 by path, or PATH.csv with a 'date' column.",
)
@click.option(
    "--root_path",
    "root_path",
    help="Upstream's data folder, joined with --data_path (the bundled copy is used for "
    "ETTh1.csv/ETTh2.csv when the file is not there).",
)
@click.option("--data_path", "data_path", help="Upstream's CSV file name inside --root_path.")
@click.option(
    "--llm",
    "--llm_model",
    "llm",
    help="Backbone: tiny-gpt2 (offline), gpt2/GPT2, llama/LLAMA, bert/BERT, a HF model id in "
    "the local cache, or a local PATH (GPT2/LLAMA/BERT need their weights in the HF cache: "
    "nothing is downloaded).",
)
@click.option(
    "--llm-layers",
    "--llm_layers",
    "llm_layers",
    type=int,
    help="Keep only the first N transformer layers of the frozen LLM.",
)
@click.option(
    "--llm-dim",
    "--llm_dim",
    "llm_dim",
    type=int,
    help="The LLM's hidden size (upstream's --llm_dim): checked against the backbone.",
)
@click.option(
    "--seq-len",
    "--seq_len",
    "seq_len",
    type=int,
    help="Input window length (time steps the model sees).",
)
@click.option(
    "--label-len",
    "--label_len",
    "label_len",
    type=int,
    help="Known steps at the start of each target window (at most --seq-len).",
)
@click.option(
    "--pred-len",
    "--pred_len",
    "pred_len",
    type=int,
    help="Forecast horizon (time steps predicted).",
)
@click.option(
    "--features",
    type=click.Choice(["M", "S", "MS"]),
    help="M: every variable, S: the target only, MS: every variable, scored on the target.",
)
@click.option("--target", help="Target column for --features S/MS (default OT).")
@click.option("--freq", help="Frequency of the calendar features (h, t, 15min, ...).")
@click.option(
    "--embed",
    type=click.Choice(["timeF", "fixed", "learned"]),
    help="Calendar-feature encoding: timeF (default) or the integer fields (fixed/learned).",
)
@click.option("--percent", type=int, help="Few-shot: keep this % of the training windows.")
@click.option("--d-model", "--d_model", "d_model", type=int, help="Patch embedding width.")
@click.option("--d-ff", "--d_ff", "d_ff", type=int, help="LLM output channels kept by the head.")
@click.option(
    "--n-heads", "--n_heads", "n_heads", type=int, help="Heads of the reprogramming attention."
)
@click.option("--dropout", type=float, help="Dropout of the trainable layers.")
@click.option(
    "--patch-len", "--patch_len", "patch_len", type=int, help="Patch length (time steps)."
)
@click.option("--stride", type=int, help="Stride between patches (time steps).")
@click.option(
    "--prompt-domain",
    "--prompt_domain",
    "prompt_domain",
    type=int,
    help="1: prompts describe the dataset; 0: upstream's one-sentence ETT text "
    "[default: 1; 0 with --compat upstream].",
)
@click.option("--description", help="Dataset description for the prompt (overrides the above).")
@click.option(
    "--batch-size", "--batch_size", "batch_size", type=int,
    help="Training batch size (first knob when out of memory).",
)  # fmt: skip
@click.option(
    "--learning-rate",
    "--learning_rate",
    "learning_rate",
    type=float,
    help="Peak learning rate of the Adam optimizer (with --compat upstream, upstream's "
    "--learning_rate: epoch schedules then run at a 25th of it, as upstream's do).",
)
@click.option(
    "--epochs",
    "--train_epochs",
    "--train-epochs",
    "train_epochs",
    type=int,
    help="Number of training epochs.",
)
@click.option(
    "--max-steps", type=int, help="Stop after this many optimizer steps (whatever --epochs says)."
)
@click.option(
    "--lradj",
    type=click.Choice(["type1", "type2", "type3", "PEMS", "TST", "constant", "COS"]),
    help="Learning-rate schedule, upstream's names (type1: halve every epoch after the first).",
)
@click.option(
    "--pct-start",
    "--pct_start",
    "pct_start",
    type=float,
    help="Warm-up fraction of the TST (one-cycle) schedule.",
)
@click.option(
    "--patience",
    type=int,
    help="Early stopping: validations (epochs under compat) without improvement.",
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
    "--use_amp",
    "use_amp",
    is_flag=True,
    default=None,
    help="Upstream's mixed precision: the same as --dtype fp16 (unless --dtype is given).",
)
@click.option(
    "--quantize",
    type=click.Choice(["4bit", "8bit", "none"]),
    help="Load the frozen LLM with bitsandbytes in 4/8 bit (CUDA only).",
)
@click.option(
    "--num-workers", "--num_workers", "num_workers", type=int, help="DataLoader worker processes."
)
@click.option("--seed", type=int, help="Random seed (data order, initialization, dropout).")
@click.option(
    "--no-test", is_flag=True, help="Skip the final test evaluation of the best checkpoint."
)
@click.option(
    "--print-config",
    is_flag=True,
    help="Print the resolved config and run options (and the notes on ignored upstream "
    "options) as JSON, and exit without training.",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show a progress bar [default: only on a terminal].",
)
@click.pass_context
def train_cmd(ctx: click.Context, **kw: Any) -> None:
    """Train Time-LLM (a frozen LLM reprogrammed for forecasting) on ETT or a CSV,
    with checkpoints that survive interruption.

    Kill it, lose the VM, hit the time limit: run the same command again and it resumes
    exactly (--resume auto). Exit code 75 means it stopped early on purpose (SIGTERM,
    SIGUSR1, Ctrl+C or --time-limit) after saving; run it again to continue.
    """
    tl = _timellm()
    notes = upstream_notes(list(ctx.args))
    preset = kw.pop("preset")
    print_config = kw.pop("print_config")
    kw["data"] = resolve_data(kw["data"], kw.pop("root_path"), kw.pop("data_path"))
    overrides = {name: kw.pop(name) for name in _CONFIG_OPTIONS}
    if overrides["compat"] == "none":
        overrides["compat"] = None
    elif overrides["compat"] is None:
        del overrides["compat"]
    if (embed := kw.pop("embed")) is not None:
        overrides["timeenc"] = 1 if embed == "timeF" else 0
    if (domain := overrides.pop("prompt_domain", None)) is not None:
        overrides["prompt_domain"] = bool(domain)
    if kw.pop("use_amp") and overrides["dtype"] is None:
        overrides["dtype"] = "fp16"
    quantize = kw.pop("quantize")
    if quantize is not None:
        overrides["quantize"] = None if quantize == "none" else quantize
    cfg = tl.get_preset(preset, **{k: v for k, v in overrides.items() if v is not None})
    run = dict(tl.train.RUN_DEFAULTS.get(preset, {}))
    if cfg.compat == "upstream":
        # Upstream trains every epoch and validates on the whole split: a preset's step
        # cap and validation subset are speed defaults, not the user's choice.
        run.pop("eval_batches", None)
        if overrides["max_steps"] is None:
            cfg = cfg.replace(max_steps=None)
    run.update({k: v for k, v in kw.items() if v is not None})
    run["test"] = not run.pop("no_test", False)
    if run.get("output") is None:
        run["output"] = f"runs/{preset}-{cfg.data.rsplit('/', 1)[-1].removesuffix('.csv')}"
    opts = tl.train.RunOptions(**run)
    if print_config:
        out = {"config": cfg.to_dict(), "run": dataclasses.asdict(opts), "ignored": notes}
        click.echo(json.dumps(out, indent=1))
        return
    for option, reason in notes.items():
        click.echo(f"note: {option} ignored: {reason}", err=True)
    if notes and cfg.compat is None:
        click.echo(
            "note: upstream options given without --compat upstream: ckptkit's training "
            "semantics apply (see timellm/README.md)",
            err=True,
        )
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
