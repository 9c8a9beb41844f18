"""Forecasting with a trained run (timellm.predict and `ckptkit predict`): the CSV's shape,
dates and columns, the PNG, which checkpoint is used, and clean errors for bad input."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import ckptkit
from ckptkit import CheckpointManager
from timellm.data.loading import bundled_path
from timellm.predict import predict

from .train_script import assert_one_line_error, finished_run, one_thread, timellm_cli

PRED_LEN = 8


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finished_run(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def cli() -> Iterator[click.Group]:
    with timellm_cli() as group:
        yield group


def test_cli_writes_forecast_csv_and_png(cli: click.Group, finished: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "forecast.csv", tmp_path / "forecast.png"
    args = ["predict", "--checkpoint", str(finished), "--data", "ETTh1", "--out", str(out)]
    result = CliRunner().invoke(cli, [*args, "--plot", str(png)])
    assert result.exit_code == 0, result.output + result.stderr
    columns = ckptkit.load(str(finished))["data_scaler"]["columns"]
    assert len(columns) == 7  # ETTh1, all variables
    assert f"wrote {PRED_LEN} forecast rows x 7 variables" in result.output
    forecast = pd.read_csv(out)
    assert list(forecast.columns) == ["date", *columns] and len(forecast) == PRED_LEN
    assert np.isfinite(forecast[columns].to_numpy()).all()
    last = pd.to_datetime(pd.read_csv(bundled_path("ETTh1"))["date"]).iloc[-1]
    expected = pd.date_range(last, periods=PRED_LEN + 1, freq="h")[1:]
    assert (pd.to_datetime(forecast["date"]) == expected).all()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_which_checkpoint(finished: Path, tmp_path: Path) -> None:
    def forecast(checkpoint: Path, **kw: str) -> pd.DataFrame:
        return predict(str(checkpoint), "ETTh1", str(tmp_path / "f.csv"), **kw)

    best = forecast(finished)  # the best by validation MSE: step 8 in the tiny run
    pd.testing.assert_frame_equal(best, forecast(finished, which="8"))
    latest = forecast(finished, which="latest")
    assert not latest.equals(best)
    pd.testing.assert_frame_equal(latest, forecast(finished / "step-000000000012"))
    with pytest.raises(ckptkit.CheckpointNotFoundError, match="steps: 4, 8, 12"):
        forecast(finished, which="5")


def test_forecast_from_a_csv_continues_it(finished: Path, tmp_path: Path) -> None:
    etth1 = pd.read_csv(bundled_path("ETTh1"))
    csv = tmp_path / "recent.csv"
    etth1.iloc[-50:].to_csv(csv, index=False)  # fewer rows, same end: the same forecast
    bundled = predict(str(finished), "ETTh1", str(tmp_path / "a.csv"))
    pd.testing.assert_frame_equal(
        predict(str(finished), str(csv), str(tmp_path / "b.csv")), bundled
    )


def test_bad_input_is_one_line(cli: click.Group, finished: Path, tmp_path: Path) -> None:
    etth1 = pd.read_csv(bundled_path("ETTh1"))
    missing, short = tmp_path / "missing.csv", tmp_path / "short.csv"
    etth1.drop(columns=["HUFL", "OT"]).iloc[-100:].to_csv(missing, index=False)
    etth1.iloc[-10:].to_csv(short, index=False)
    other = tmp_path / "other-run"
    with CheckpointManager(str(other)) as mgr:
        mgr.save(1, {"model": torch.nn.Linear(2, 2)})
    out = tmp_path / "f.csv"
    cases = [
        (finished, missing, 2, "missing column(s) HUFL, OT"),
        (finished, short, 2, "seq_len=32"),
        (other, "ETTh1", 6, "not a Time-LLM checkpoint"),
        (finished, tmp_path / "nope.csv", 2, "nope.csv"),
    ]
    for checkpoint, data, code, words in cases:
        args = ["predict", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out)]
        result = CliRunner().invoke(cli, args)
        assert_one_line_error(result.exit_code, result.stderr, code, words)
    assert not out.exists()
