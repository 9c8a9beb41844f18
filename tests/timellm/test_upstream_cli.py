"""`ckptkit train` with upstream's own argument lists: every option of upstream's ETT
scripts (``golden/upstream_scripts.json``, extracted from KimMeen/Time-LLM @ 0045cde)
maps to a config value or is ignored with a reason; run-changing options ckptkit does not
support are one-line errors; a pasted list trains."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from .train_script import assert_one_line_error, one_thread, records, timellm_cli

SCRIPTS = json.loads((Path(__file__).parent / "golden" / "upstream_scripts.json").read_text())
RUNS = [(name, i, argv) for name, runs in SCRIPTS["scripts"].items() for i, argv in enumerate(runs)]

# What each upstream option becomes in TimeLLMConfig: (field, value from the argument).
# Written here independently of the CLI: this is the mapping the CLI must implement.
MAPPED: dict[str, tuple[str, Any]] = {
    "seq_len": ("seq_len", int),
    "label_len": ("label_len", int),
    "pred_len": ("pred_len", int),
    "features": ("features", str),
    "d_model": ("d_model", int),
    "d_ff": ("d_ff", int),
    "batch_size": ("batch_size", int),
    "learning_rate": ("learning_rate", float),
    "llm_layers": ("llm_layers", int),
    "train_epochs": ("train_epochs", int),
    "lradj": ("lradj", str),
    "patience": ("patience", int),
    # --data ETTh1 with --root_path/--data_path of a file that is not there: the bundled
    # copy of the same file (ETTm*, not bundled, keep their name: a "download" error later).
    "data": ("data", str),
    "data_path": ("data", lambda v: v.removesuffix(".csv")),
}
# Read together with --data_path (checked there): the folder the CSV is in.
WITH_DATA_PATH = {"root_path"}
# Upstream options that name nothing in our config: the reason must say why.
IGNORED = {
    "task_name", "is_training", "model_id", "model", "model_comment", "des", "itr", "factor",
    "enc_in", "dec_in", "c_out",
}  # fmt: skip


@pytest.fixture(scope="module")
def cli() -> Iterator[click.Group]:
    with one_thread(), timellm_cli() as group:
        yield group


def invoke(cli: click.Group, *args: str | Path) -> Result:
    return CliRunner().invoke(cli, ["train", *[str(a) for a in args]])


def printed_config(cli: click.Group, *args: str | Path) -> dict[str, Any]:
    result = invoke(cli, "--print-config", *args)
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


def options(argv: list[str]) -> dict[str, str]:
    return {argv[i].removeprefix("--"): argv[i + 1] for i in range(0, len(argv), 2)}


def test_the_script_data_is_upstreams() -> None:
    assert SCRIPTS["commit"] == "0045cde1ae0a7e7960b8f2273404eabac0f9c5da"
    assert sorted(SCRIPTS["scripts"]) == [f"TimeLLM_ETT{s}.sh" for s in ("h1", "h2", "m1", "m2")]
    assert all(len(runs) == 4 for runs in SCRIPTS["scripts"].values())


@pytest.mark.parametrize(("script", "index", "argv"), RUNS, ids=[f"{s}:{i}" for s, i, _ in RUNS])
def test_every_option_of_upstreams_ett_scripts_is_mapped_or_ignored_with_a_reason(
    cli: click.Group, script: str, index: int, argv: list[str]
) -> None:
    out = printed_config(cli, *argv)
    cfg, ignored = out["config"], out["ignored"]
    for name, value in options(argv).items():
        if name in MAPPED:
            field, convert = MAPPED[name]
            assert cfg[field] == convert(value), (name, value, cfg[field])
        elif name in WITH_DATA_PATH:
            assert "data_path" in options(argv)
        else:
            assert name in IGNORED, f"{script}: no expectation for --{name}"
            assert len(ignored.get(f"--{name}", "")) > 15, name
    assert set(ignored) == {f"--{n}" for n in options(argv) if n in IGNORED}


def test_compat_is_a_config_field_and_clears_preset_speed_defaults(cli: click.Group) -> None:
    ours = printed_config(cli)
    assert ours["config"]["compat"] is None and ours["config"]["max_steps"] == 300
    out = printed_config(cli, "--compat", "upstream")
    assert out["config"]["compat"] == "upstream"
    assert out["config"]["max_steps"] is None and out["run"]["eval_batches"] is None
    explicit = printed_config(
        cli, "--compat", "upstream", "--max-steps", "7", "--eval-batches", "2"
    )
    assert explicit["config"]["max_steps"] == 7 and explicit["run"]["eval_batches"] == 2


def test_upstream_spellings_and_ours_set_the_same_fields(cli: click.Group) -> None:
    upstream = printed_config(
        cli, "--llm_model", "GPT2", "--llm_dim", "768", "--batch_size", "24",
        "--learning_rate", "0.02", "--lradj", "TST", "--pct_start", "0.3", "--patience", "3",
        "--prompt_domain", "1", "--percent", "10", "--n_heads", "4", "--patch_len", "8",
        "--stride", "4", "--dropout", "0.2", "--embed", "fixed", "--num_workers", "2",
        "--use_amp", "--freq", "h", "--target", "HUFL", "--features", "MS", "--seed", "7",
    )["config"]  # fmt: skip
    ours = printed_config(
        cli, "--llm", "GPT2", "--llm-dim", "768", "--batch-size", "24",
        "--learning-rate", "0.02", "--lradj", "TST", "--pct-start", "0.3", "--patience", "3",
        "--prompt-domain", "1", "--percent", "10", "--n-heads", "4", "--patch-len", "8",
        "--stride", "4", "--dropout", "0.2", "--embed", "fixed", "--num-workers", "2",
        "--dtype", "fp16", "--freq", "h", "--target", "HUFL", "--features", "MS", "--seed", "7",
    )["config"]  # fmt: skip
    assert upstream == ours
    assert (upstream["llm"], upstream["llm_dim"], upstream["timeenc"]) == ("GPT2", 768, 0)
    assert upstream["prompt_domain"] is True and upstream["dtype"] == "fp16"
    # A later option overrides an earlier one, whichever the spelling (argparse's rule).
    assert printed_config(cli, "--seq_len", "512", "--seq-len", "64")["config"]["seq_len"] == 64


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--output_attention",), "--output_attention"),
        (("--task_name", "short_term_forecast"), "--task_name short_term_forecast"),
        (("--model", "DLinear"), "--model DLinear"),
        (("--itr", "3"), "--itr 3"),
        (("--no_such_thing", "1"), "--no_such_thing"),
        (("--des",), "--des"),
        (("--compat", "upstream", "--eval-every", "5"), "eval-every"),
    ],
)
def test_unsupported_upstream_options_are_one_line_errors(
    cli: click.Group, tmp_path: Path, args: tuple[str, ...], words: str
) -> None:
    result = invoke(cli, *args, "--output", tmp_path / "run")
    assert_one_line_error(result.exit_code, result.stderr, 2, words)
    assert not (tmp_path / "run").exists()


def test_upstream_llms_offline_are_a_clear_error(cli: click.Group, tmp_path: Path) -> None:
    for name, repo in (("GPT2", "openai-community/gpt2"), ("LLAMA", "huggyllama/llama-7b")):
        result = invoke(cli, "--llm_model", name, "--output", tmp_path / name, "--no-progress")
        assert_one_line_error(result.exit_code, result.stderr, 2, repo, "offline", "download")


def test_llm_dim_must_match_the_backbone(cli: click.Group, tmp_path: Path) -> None:
    result = invoke(cli, "--llm_dim", "768", "--output", tmp_path / "r", "--no-progress")
    assert_one_line_error(result.exit_code, result.stderr, 2, "llm_dim", "768", "64")


def test_help_documents_upstream_spellings(cli: click.Group) -> None:
    text = " ".join(invoke(cli, "--help").output.split())
    for spelling in ("--seq_len", "--learning_rate", "--llm_model", "--llm_dim", "--batch_size",
                     "--train_epochs", "--prompt_domain", "--root_path", "--use_amp",
                     "--model_id", "--des", "--itr", "--output_attention", "--compat"):  # fmt: skip
        assert spelling in text, spelling


def test_a_pasted_upstream_argument_list_trains(cli: click.Group, tmp_path: Path) -> None:
    """ETTh1's first run, verbatim; appended options make it tiny (later ones win)."""
    argv = SCRIPTS["scripts"]["TimeLLM_ETTh1.sh"][0]
    tiny = [
        "--llm", "tiny-gpt2", "--llm_layers", "2", "--seq_len", "32", "--label_len", "16",
        "--pred_len", "8", "--d_model", "16", "--d_ff", "32", "--batch_size", "32",
        "--features", "S", "--percent", "1", "--train_epochs", "5", "--eval-batches", "1",
        "--log-every", "1",
    ]  # fmt: skip
    run = tmp_path / "run"
    result = invoke(cli, "--compat", "upstream", *argv, *tiny, "--output", run, "--no-progress")
    assert result.exit_code == 0, result.output + result.stderr
    assert "note: --model_id ignored" in result.stderr
    lrs = [r["lr"] for r in records(run) if "train_loss" in r]
    # 2 steps per epoch, 5 epochs: upstream's own type1 numbers (golden/upstream_lr.json).
    golden = json.loads((Path(__file__).parent / "golden" / "upstream_lr.json").read_text())
    case = next(
        c
        for c in golden["cases"]
        if (c["lradj"], c["train_steps"], c["train_epochs"]) == ("type1", 2, 5)
    )
    assert case["learning_rate"] == 0.01 and lrs == case["lr"]


# Options run_main.py declares whose default ckptkit refuses, with the words of the error.
REFUSED_DEFAULTS = {"model": "--model Autoformer", "output_attention": "--output_attention"}


def upstream_argv(option: dict[str, Any]) -> list[str]:
    """``--name`` (a flag) or ``--name DEFAULT``: the option as run_main.py declares it."""
    flag = option["action"] == "store_true"
    return [f"--{option['name']}"] + ([] if flag else [str(option["default"])])


@pytest.mark.parametrize("option", SCRIPTS["options"], ids=lambda o: o["name"])
def test_every_option_run_main_declares_is_accepted_or_refused_by_name(
    cli: click.Group, tmp_path: Path, option: dict[str, Any]
) -> None:
    result = invoke(cli, "--print-config", *upstream_argv(option), "--output", tmp_path / "r")
    if option["name"] in REFUSED_DEFAULTS:
        words = REFUSED_DEFAULTS[option["name"]]
        assert_one_line_error(result.exit_code, result.stderr, 2, words, "not supported")
        return
    assert result.exit_code == 0, result.output + result.stderr
    out = json.loads(result.stdout)
    # Either a train option (a config value or a run option) or ignored with its reason.
    declared = {o for p in cli.commands["train"].params for o in p.opts}
    assert f"--{option['name']}" in declared or len(out["ignored"][f"--{option['name']}"]) > 15


def test_run_mains_whole_default_command_line_is_accepted(cli: click.Group) -> None:
    argv = [
        word
        for option in SCRIPTS["options"]
        if option["name"] not in REFUSED_DEFAULTS
        for word in upstream_argv(option)
    ]
    cfg = printed_config(cli, *argv, "--model", "TimeLLM")["config"]
    assert (cfg["seq_len"], cfg["pred_len"], cfg["learning_rate"]) == (96, 96, 0.0001)
    assert (cfg["llm"], cfg["llm_dim"], cfg["llm_layers"]) == ("LLAMA", 4096, 6)
    assert cfg["prompt_domain"] is False and cfg["data"] == "ETTh1" and cfg["dtype"] == "fp16"
