"""``--compat upstream``: upstream Time-LLM's training semantics, checked against numbers
that upstream's own code produced (``golden/``, written by ``golden/make_golden.py`` from
KimMeen/Time-LLM @ 0045cde), and the defaults that deliberately differ from it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptkit import EarlyStopping

GOLDEN = Path(__file__).parent / "golden"
UPSTREAM_COMMIT = "0045cde1ae0a7e7960b8f2273404eabac0f9c5da"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    from .train_script import one_thread

    with one_thread():
        yield


def golden(name: str) -> dict[str, Any]:
    data = json.loads((GOLDEN / name).read_text())
    assert data["commit"] == UPSTREAM_COMMIT
    return data


LR_CASES = golden("upstream_lr.json")["cases"]
ES_CASES = golden("upstream_early_stopping.json")["cases"]


def _case_id(case: dict[str, Any]) -> str:
    return f"{case['lradj']}-lr{case['learning_rate']}-{case['train_steps']}x{case['train_epochs']}"


def drive_schedule(case: dict[str, Any], compat: str | None) -> list[float]:
    """The lr of every optimizer step when our trainer's schedule runs the golden case."""
    from timellm import get_preset
    from timellm.schedule import build_schedule

    cfg = get_preset(
        "tiny-cpu",
        lradj=case["lradj"],
        learning_rate=case["learning_rate"],
        pct_start=case["pct_start"],
        train_epochs=case["train_epochs"],
        max_steps=None,
        compat=compat,
    )
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=cfg.learning_rate)
    steps = case["train_steps"]
    schedule = build_schedule(opt, cfg, steps_per_epoch=steps, total_steps=steps * cfg.train_epochs)
    used = []
    for _epoch in range(cfg.train_epochs):
        for _ in range(steps):
            param.grad = torch.zeros_like(param)
            used.append(opt.param_groups[0]["lr"])
            opt.step()
            schedule.after_step()
        schedule.after_epoch()
    return used


@pytest.mark.parametrize("case", LR_CASES, ids=_case_id)
def test_compat_schedule_matches_upstream_at_every_step(case: dict[str, Any]) -> None:
    assert drive_schedule(case, "upstream") == case["lr"]


@pytest.mark.parametrize("stop", [4, 6, 7], ids=["mid-epoch", "epoch-end", "next-epoch"])
@pytest.mark.parametrize("lradj", ["type1", "type2", "type3", "PEMS", "constant", "COS", "TST"])
def test_compat_schedule_resumed_from_its_state_continues_upstreams_sequence(
    lradj: str, stop: int
) -> None:
    from timellm import get_preset
    from timellm.schedule import build_schedule

    case = next(c for c in LR_CASES if c["lradj"] == lradj and c["train_steps"] == 3)
    cfg = get_preset(
        "tiny-cpu", compat="upstream", lradj=lradj, learning_rate=case["learning_rate"],
        pct_start=case["pct_start"], train_epochs=case["train_epochs"], max_steps=None,
    )  # fmt: skip
    steps = case["train_steps"]

    def fresh() -> tuple[torch.nn.Parameter, torch.optim.Optimizer, Any]:
        param = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.Adam([param], lr=cfg.learning_rate)
        return param, opt, build_schedule(opt, cfg, steps, steps * cfg.train_epochs)

    param, opt, schedule = fresh()
    used: list[float] = []
    saved: dict[str, Any] = {}
    for step in range(steps * cfg.train_epochs):
        if step == stop:  # a checkpoint here, then a new process
            saved = {"opt": opt.state_dict(), "schedule": schedule.state_dict()}
            param, opt, schedule = fresh()
            opt.load_state_dict(saved["opt"])
            schedule.load_state_dict(saved["schedule"])
        param.grad = torch.zeros_like(param)
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.after_step()
        if (step + 1) % steps == 0:
            schedule.after_epoch()
    assert saved and used == case["lr"]


def test_compat_lr_is_upstreams_learning_rate_over_25_for_epoch_schedules() -> None:
    # Documented upstream behaviour: OneCycleLR's constructor sets lr to max_lr/25, and
    # run_main.py copies that into args.learning_rate after the first epoch.
    case = next(c for c in LR_CASES if c["lradj"] == "constant")
    assert drive_schedule(case, "upstream") == [pytest.approx(case["learning_rate"] / 25)] * len(
        case["lr"]
    )


def test_default_type2_takes_the_latest_table_entry() -> None:
    case = next(c for c in LR_CASES if c["lradj"] == "type2" and c["train_epochs"] > 20)
    steps = case["train_steps"]
    per_epoch = drive_schedule(case, None)[::steps]
    # Our default keeps the full learning rate for the first epochs (no /25) but follows
    # upstream's table from epoch 2 on: 5e-5, then 1e-5 from epoch 4, ... 5e-8 from 20.
    assert per_epoch[:2] == [case["learning_rate"]] * 2
    assert per_epoch[2:] == case["lr"][2 * steps :: steps]


def test_default_tst_resumed_past_its_cycle_is_refused_not_a_crash(tmp_path: Path) -> None:
    import ckptkit
    from timellm.train import train

    from .train_script import quiet, tiny_config, tiny_options

    cfg = tiny_config(lradj="TST", max_steps=4)
    assert train(cfg, tiny_options(tmp_path / "run"), echo=quiet)["step"] == 4
    with pytest.raises(ckptkit.IncompatibleCheckpointError, match="spans 4 steps.*max_steps"):
        train(cfg.replace(max_steps=8), tiny_options(tmp_path / "run"), echo=quiet)
    # A shorter run is fine: the cycle is cut, not overrun; other schedules may extend.
    assert train(cfg.replace(max_steps=3), tiny_options(tmp_path / "run"), echo=quiet)["step"] == 4
    longer = tiny_options(tmp_path / "type1")
    assert train(cfg.replace(lradj="type1"), longer, echo=quiet)["step"] == 4
    assert train(cfg.replace(lradj="type1", max_steps=8), longer, echo=quiet)["step"] == 8


@pytest.mark.parametrize("case", ES_CASES, ids=lambda c: f"p{c['patience']}-d{c['delta']}")
def test_early_stopping_with_upstreams_tie_rule_matches_upstream(case: dict[str, Any]) -> None:
    stopper = EarlyStopping(patience=case["patience"], delta=case["delta"], tie_improves=True)
    got = []
    for call in case["calls"]:
        best = stopper.step(call["val_loss"])
        got.append(
            {
                "val_loss": call["val_loss"],
                "new_best": best,
                "counter": stopper.counter,
                "early_stop": stopper.should_stop,
            }
        )
    assert got == case["calls"]


def test_early_stopping_tie_rule_survives_a_resume_and_keeps_the_default() -> None:
    default = EarlyStopping(patience=2)
    default.step(1.0)
    assert default.step(1.0) is False and default.counter == 1  # ours: a tie is no progress
    upstream = EarlyStopping(patience=2, tie_improves=True)
    upstream.step(1.0)
    state = upstream.state_dict()
    resumed = EarlyStopping(patience=2, tie_improves=True)
    resumed.load_state_dict(state)
    assert resumed.step(1.0) is True and resumed.counter == 0
    maximize = EarlyStopping(patience=2, mode="max", tie_improves=True)
    maximize.step(0.5)
    assert maximize.step(0.5) is True and maximize.step(0.4) is False


# -- prompt ----------------------------------------------------------------------------

# sha256 of upstream's dataset/prompt_bank/ETT.txt at 0045cde.
UPSTREAM_ETT_TXT_SHA256 = "bf608086aa93f5aea199375531c74fbc2d9c890cf2233f57415b1575356b2eb6"
ETT_TXT = Path(__file__).parents[2] / "timellm" / "datasets" / "prompt_bank" / "ETT.txt"


def test_compat_prompt_defaults_to_upstreams_one_sentence() -> None:
    from timellm import dataset_description, get_preset
    from timellm.model.timellm import UPSTREAM_DEFAULT_DESCRIPTION, resolve_description

    assert resolve_description(get_preset("tiny-cpu", compat="upstream")) == (
        UPSTREAM_DEFAULT_DESCRIPTION
    )
    # Ours keeps the per-subset description by default (a documented difference).
    assert resolve_description(get_preset("tiny-cpu")) == dataset_description("ETTh1")


@pytest.mark.parametrize("data", ["ETTh1", "ETTm2", "/somewhere/ETTh2.csv"])
def test_compat_domain_prompt_is_upstreams_ett_txt_byte_for_byte(data: str) -> None:
    import hashlib

    from timellm import get_preset
    from timellm.model.timellm import resolve_description

    raw = ETT_TXT.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == UPSTREAM_ETT_TXT_SHA256
    cfg = get_preset("tiny-cpu", compat="upstream", prompt_domain=True, data=data)
    text = resolve_description(cfg)
    assert text.encode() == raw and text.endswith("months.\n\n")


def test_compat_domain_prompt_reaches_the_model_and_unknown_data_is_refused() -> None:
    import ckptkit
    from timellm import build_model, get_preset

    cfg = get_preset("tiny-cpu", compat="upstream", prompt_domain=True)
    model = build_model(cfg)
    prompt = model.prompt.texts(torch.zeros(1, cfg.seq_len, 1))[0]
    assert f"Dataset description: {ETT_TXT.read_text()}Task description:" in prompt
    with pytest.raises(ckptkit.ConfigError, match="no prompt-bank text.*prompt_domain=False"):
        build_model(cfg.replace(data="/data/sales.csv"))


# -- a real run under compat -----------------------------------------------------------

# ETTh1, one variable, 1 % of the training windows: 79 windows, 2 batches of 32 per epoch.
RUN_CASE = next(c for c in LR_CASES if (c["train_steps"], c["train_epochs"]) == (2, 5))


def run_case(lradj: str) -> dict[str, Any]:
    return next(c for c in LR_CASES if c["lradj"] == lradj and c["train_steps"] == 2)


def compat_config(**overrides: Any) -> Any:
    from .train_script import tiny_config

    return tiny_config(
        **{
            "compat": "upstream",
            "features": "S",
            "percent": 1,
            "batch_size": 32,
            "max_steps": None,
            "train_epochs": RUN_CASE["train_epochs"],
            "learning_rate": RUN_CASE["learning_rate"],
            "pct_start": RUN_CASE["pct_start"],
            **overrides,
        }
    )


def compat_run(run: Path, cfg: Any, **options: Any) -> dict[str, Any]:
    from timellm.train import train

    from .train_script import quiet, tiny_options

    opts = tiny_options(run, **{"log_every": 1, "eval_batches": 1, "save_steps": None, **options})
    return train(cfg, opts, echo=quiet)


def step_lrs(run: Path) -> list[float]:
    from .train_script import records

    return [r["lr"] for r in records(run) if "train_loss" in r]


@pytest.mark.parametrize("lradj", ["type1", "type2", "type3", "PEMS", "constant", "COS", "TST"])
def test_compat_run_records_upstreams_lr_at_every_step(tmp_path: Path, lradj: str) -> None:
    from .train_script import records

    want = run_case(lradj)["lr"]
    summary = compat_run(tmp_path / "run", compat_config(lradj=lradj))
    assert summary["exit_code"] == 0 and summary["step"] == len(want) == 10
    assert step_lrs(tmp_path / "run") == want
    # Validation once per epoch, upstream's average reported next to ours.
    vals = [r for r in records(tmp_path / "run") if "val_mse" in r]
    assert [r["step"] for r in vals] == [2, 4, 6, 8, 10]
    assert all("val_mse_upstream" in r and "val_mae_upstream" in r for r in vals)
    assert "test_mse_upstream" in summary


def test_compat_max_steps_truncates_without_rescaling_the_schedule(tmp_path: Path) -> None:
    from .train_script import records

    want = run_case("TST")["lr"]
    for max_steps, validated in ((3, [2]), (4, [2, 4])):
        run = tmp_path / f"max{max_steps}"
        summary = compat_run(run, compat_config(lradj="TST", max_steps=max_steps))
        assert summary["step"] == max_steps
        assert step_lrs(run) == want[:max_steps]
        # An epoch's last step still validates; a partial epoch does not.
        assert [r["step"] for r in records(run) if "val_mse" in r] == validated


def test_compat_run_resumes_to_the_same_lrs_and_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import signal

    import timellm.train as train_mod

    from .train_script import records

    cfg = compat_config(lradj="type1")
    compat_run(tmp_path / "ref", cfg)
    real, calls = train_mod._train_step, [0]

    def step(*args: Any, **kwargs: Any) -> float:
        loss = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == 5:  # mid-epoch 3, between two checkpoints (every 3 steps)
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(train_mod, "_train_step", step)
    assert compat_run(tmp_path / "run", cfg, save_steps=3)["exit_code"] == 75
    monkeypatch.setattr(train_mod, "_train_step", real)
    assert compat_run(tmp_path / "run", cfg, save_steps=3)["step"] == 10
    assert records(tmp_path / "run") == records(tmp_path / "ref")


def test_compat_best_checkpoint_follows_the_tie_rule(tmp_path: Path) -> None:
    from ckptkit import CheckpointManager

    for tie_improves, best_step in ((True, 2), (False, 1)):
        early = EarlyStopping(patience=3, tie_improves=tie_improves)
        run = str(tmp_path / f"tie-{tie_improves}")
        # As the trainer wires it: compat ranks by the EarlyStopping's marks, ours by metric.
        metric = None if tie_improves else "val_mse"
        with CheckpointManager(run, keep_last=1, best_metric=metric) as mgr:
            for step, loss in ((1, 0.5), (2, 0.5), (3, 0.7)):
                early.step(loss, step)
                mgr.save(step, {"early": early, "w": torch.zeros(1)}, metrics={"val_mse": loss})
            assert mgr.best().step == best_step
            assert sorted(c.step for c in mgr.list()) == [best_step, 3]


def test_compat_refuses_a_split_smaller_than_one_batch(tmp_path: Path) -> None:
    import numpy as np
    import pandas as pd

    import ckptkit

    csv = tmp_path / "small.csv"
    rows = 200  # custom 70/10/20 split: 13 validation windows of one variable
    dates = pd.date_range("2020-01-01", periods=rows, freq="h").astype(str)
    pd.DataFrame({"date": dates, "OT": np.sin(np.arange(rows) / 5)}).to_csv(csv, index=False)
    cfg = compat_config(data=str(csv), percent=100, train_epochs=1)
    with pytest.raises(ckptkit.ConfigError, match="validation split has 13 windows.*--batch-size"):
        compat_run(tmp_path / "run", cfg)
    assert compat_run(tmp_path / "ours", cfg.replace(compat=None))["exit_code"] == 0


def test_compat_resume_refuses_another_train_epochs(tmp_path: Path) -> None:
    import ckptkit

    cfg = compat_config(lradj="TST", train_epochs=2)
    assert compat_run(tmp_path / "run", cfg)["step"] == 4
    # Upstream's schedule is sized by train_epochs: more epochs is another run, not more of it.
    with pytest.raises(ckptkit.IncompatibleCheckpointError, match="train_epochs: 2 -> 3"):
        compat_run(tmp_path / "run", cfg.replace(train_epochs=3))
    with pytest.raises(ckptkit.IncompatibleCheckpointError, match="spans 4 steps, this run's 6"):
        compat_run(tmp_path / "run", cfg.replace(train_epochs=3), force=True)
    # Ours may extend a run (its lr schedule is per epoch, or sized by the run's steps).
    ours = tmp_path / "ours"
    compat_run(ours, cfg.replace(compat=None, lradj="type1"), save_steps=1)
    assert compat_run(ours, cfg.replace(compat=None, lradj="type1", train_epochs=3))["step"] == 6
