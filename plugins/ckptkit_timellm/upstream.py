"""Upstream ``run_main.py``'s command line (KimMeen/Time-LLM @ 0045cde), as ``ckptkit
train`` reads it: the options that set a config value are ``ckptkit train`` options under
both spellings (``--seq-len``/``--seq_len``); this module holds the rest, each accepted
with the reason it changes nothing here, or refused with why, and turns upstream's
``--root_path``/``--data_path`` into a dataset. It imports nothing of ``timellm`` at import
time, so ``ckptkit --help`` works without the Time-LLM extras.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ckptkit.errors import ConfigError


@dataclass(frozen=True)
class Ignored:
    """An upstream option accepted with a note: ``reason`` says why it changes nothing.
    ``only``: the values accepted (any other would change the run and is refused, with
    ``refusal`` as the fix)."""

    reason: str
    flag: bool = False  # takes no value
    only: tuple[str, ...] | None = None
    refusal: str = ""


_AUTOFORMER = "read only by upstream's Autoformer/DLinear models, not by TimeLLM"
_NAMING = "only names upstream's checkpoint folder; ckptkit's run is named by --output"

UPSTREAM_IGNORED: dict[str, Ignored] = {
    "task_name": Ignored(
        _NAMING,
        only=("long_term_forecast",),
        refusal="only long-term forecasting (run_main.py's task) is implemented",
    ),
    "is_training": Ignored("run_main.py never reads it (it always trains)"),
    "model_id": Ignored(_NAMING),
    "model": Ignored(
        "selects upstream's model class; this trainer is TimeLLM",
        only=("TimeLLM",),
        refusal="only TimeLLM is implemented, not Autoformer or DLinear",
    ),
    "model_comment": Ignored(_NAMING),
    "des": Ignored(_NAMING),
    "itr": Ignored(
        "1 repetition is one run",
        only=("1",),
        refusal="run ckptkit train once per repetition, each with its own --output",
    ),
    "checkpoints": Ignored(
        "upstream's checkpoint folder (which it deletes at the end); ckptkit saves to --output"
    ),
    "loader": Ignored("run_main.py never reads it"),
    "seasonal_patterns": Ignored("read only for the M4 dataset"),
    "enc_in": Ignored(
        "Time-LLM is channel independent: upstream's TimeLLM stores it and never uses it "
        "(FlattenHead's n_vars, a non-affine Normalize)"
    ),
    "dec_in": Ignored(_AUTOFORMER),
    "c_out": Ignored(_AUTOFORMER),
    "e_layers": Ignored(_AUTOFORMER),
    "d_layers": Ignored(_AUTOFORMER),
    "moving_avg": Ignored(_AUTOFORMER),
    "factor": Ignored(_AUTOFORMER),
    "activation": Ignored(_AUTOFORMER),
    "align_epochs": Ignored("run_main.py never reads it"),
    "eval_batch_size": Ignored("read only by upstream's M4 test (run_m4.py)"),
    "loss": Ignored("run_main.py trains with nn.MSELoss whatever --loss says"),
    "output_attention": Ignored(
        "",
        flag=True,
        only=(),
        refusal="with it run_main.py keeps only the first sample of every batch "
        "(outputs = model(...)[0]); drop the option",
    ),
}


def upstream_notes(args: list[str]) -> dict[str, str]:
    """``{"--option": why it is ignored}`` for upstream options in ``args`` (the words
    ``ckptkit train`` did not recognise); a ConfigError for anything refused or unknown."""
    notes: dict[str, str] = {}
    i = 0
    while i < len(args):
        word = args[i]
        name, eq, inline = word.removeprefix("--").partition("=")
        if not word.startswith("--"):
            raise ConfigError(f"unexpected argument {word!r} (options start with --)")
        spec = UPSTREAM_IGNORED.get(name)
        if spec is None:
            raise ConfigError(
                f"no such option: {word} (ckptkit train --help lists every option, "
                "upstream's spellings included)"
            )
        if spec.flag:
            value, i = None, i + 1
        elif eq:
            value, i = inline, i + 1
        elif i + 1 < len(args):
            value, i = args[i + 1], i + 2
        else:
            raise ConfigError(f"option --{name} needs a value")
        if spec.only is not None and value not in spec.only:
            shown = f"--{name}" + ("" if value is None else f" {value}")
            raise ConfigError(f"{shown} is not supported: {spec.refusal}")
        notes[f"--{name}"] = spec.reason
    return notes


def resolve_data(data: str | None, root_path: str | None, data_path: str | None) -> str | None:
    """The ``data`` value for upstream's ``--data``/``--root_path``/``--data_path``: the
    file when it exists; else the dataset its name names (ETTh1.csv -> bundled ETTh1)."""
    from timellm.data.loading import BUNDLED, ETT_HOUR, ETT_MINUTE

    if data_path is None and root_path is None:
        return data
    # Upstream's defaults: --root_path ./dataset, --data_path ETTh1.csv.
    path = os.path.join(root_path or "./dataset", data_path or "ETTh1.csv")
    if os.path.isfile(path):
        return path
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem in BUNDLED or stem in ETT_HOUR or stem in ETT_MINUTE:
        return stem  # bundled (ETTh1/ETTh2), or a one-line "download it" error later
    raise ConfigError(f"data: {path} (--root_path/--data_path) does not exist; pass the CSV's path")
