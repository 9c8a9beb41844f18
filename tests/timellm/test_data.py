"""Time-LLM data: upstream window counts, borders, scaling, time features, name resolution."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ckptkit.errors import ConfigError
from timellm import data_provider, dataset_description, get_preset, load_dataset
from timellm.data import DESCRIPTIONS, GENERIC_DESCRIPTION, bundled_path, prompt_bank_text
from timellm.data.scaler import StandardScaler


@pytest.fixture(scope="module")
def etth1_512() -> dict[str, object]:
    return {s: load_dataset("ETTh1", s, 512, 48, 96, "M") for s in ("train", "val", "test")}


def test_etth1_window_counts_match_upstream(etth1_512):
    assert [len(etth1_512[s]) for s in ("train", "val", "test")] == [56_231, 19_495, 19_495]


def test_etth1_steps_per_epoch_at_batch_32():
    cfg = get_preset("tiny-cpu", seq_len=512, label_len=48, pred_len=96, batch_size=32)
    _, loader = data_provider(cfg, "train")
    assert len(loader) == 1_757


def test_sample_is_one_variable_window(etth1_512):
    train = etth1_512["train"]
    per_feature = 8640 - 512 - 96 + 1
    assert train.windows_per_feature == per_feature and train.n_features == 7
    seq_x, seq_y, x_mark, y_mark = train[per_feature * 3 + 10]  # feature 3, start row 10
    assert seq_x.shape == (512, 1) and seq_y.shape == (48 + 96, 1)
    assert x_mark.shape == (512, 4) and y_mark.shape == (144, 4)
    np.testing.assert_array_equal(seq_x[:, 0], train.data[10:522, 3])
    np.testing.assert_array_equal(seq_y[:, 0], train.data[522 - 48 : 522 + 96, 3])
    assert train.locate(per_feature * 3 + 10) == (3, 10)


def _upstream_scaled(path, seq_len: int, split: int) -> np.ndarray:
    """Upstream Dataset_ETT_hour.__read_data__ in a few lines (float64, then float32)."""
    df = pd.read_csv(path)
    values = df[df.columns[1:]].to_numpy()
    starts = [0, 8640 - seq_len, 11520 - seq_len]
    ends = [8640, 11520, 14400]
    train = values[:8640]
    scaled = (values - train.mean(0)) / train.std(0)
    return scaled[starts[split] : ends[split]].astype(np.float32)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_borders_and_scaling_equal_upstream(etth1_512, split):
    expected = _upstream_scaled(bundled_path("ETTh1"), 512, ("train", "val", "test").index(split))
    np.testing.assert_allclose(etth1_512[split].data, expected, rtol=0, atol=1e-6)


def test_scaler_fit_on_train_only_and_inverse(etth1_512):
    train, test = etth1_512["train"], etth1_512["test"]
    assert np.allclose(train.data.mean(0), 0, atol=1e-5)
    np.testing.assert_array_equal(train.scaler.mean, test.scaler.mean)
    raw = pd.read_csv(bundled_path("ETTh1")).iloc[11520 - 512 : 11520 - 512 + 5, 1:].to_numpy()
    np.testing.assert_allclose(test.inverse_transform(test.data[:5]), raw, rtol=1e-5, atol=1e-5)


def test_inverse_transform_channel_independent(etth1_512):
    test = etth1_512["test"]
    idx = np.array([0, test.windows_per_feature * 6 + 1])  # feature 0 and feature 6 (OT)
    preds = np.stack([test[i][1] for i in idx])  # [2, 144, 1]
    back = test.inverse_transform(preds, test.feature_ids(idx))
    full = test.inverse_transform(test.data)
    np.testing.assert_allclose(back[0, :, 0], full[512 - 48 : 512 + 96, 0], rtol=1e-6)
    np.testing.assert_allclose(back[1, :, 0], full[513 - 48 : 513 + 96, 6], rtol=1e-6)
    with pytest.raises(ConfigError, match="feature_ids"):
        test.inverse_transform(preds)


def test_scaler_matches_sklearn_semantics():
    data = np.array([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]])
    s = StandardScaler().fit(data)
    np.testing.assert_allclose(s.transform(data)[:, 0], [-1.2247449, 0, 1.2247449], rtol=1e-6)
    np.testing.assert_array_equal(s.transform(data)[:, 1], 0.0)  # constant column: scale 1
    np.testing.assert_allclose(s.inverse_transform(s.transform(data)), data)


def test_time_features_timeenc0_and_1():
    raw = load_dataset("ETTh1", "train", 96, 48, 24, timeenc=0)
    # 2016-07-01 00:00 is a Friday: month 7, day 1, weekday 4, hour 0
    np.testing.assert_array_equal(raw.stamp[:2], [[7, 1, 4, 0], [7, 1, 4, 1]])
    timef = load_dataset("ETTh1", "train", 96, 48, 24, timeenc=1)
    # hour of day, day of week, day of month, day of year (2016-07-01 is day 183), in [-0.5, 0.5]
    np.testing.assert_allclose(
        timef.stamp[1], [1 / 23 - 0.5, 4 / 6 - 0.5, -0.5, 182 / 365 - 0.5], atol=1e-6
    )


def _custom_csv(tmp_path, rows: int = 400, freq: str = "h"):
    dates = pd.date_range("2020-01-01", periods=rows, freq=freq)
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "date": dates,
            "OT": rng.normal(size=rows),
            "a": rng.normal(size=rows),
            "b": np.arange(rows),
        }
    )
    path = tmp_path / "mydata.csv"
    df.to_csv(path, index=False)
    return path, df


def test_custom_csv_split_70_10_20_and_target_last(tmp_path):
    path, df = _custom_csv(tmp_path)
    train = load_dataset(str(path), "train", 24, 12, 8)
    val = load_dataset(str(path), "val", 24, 12, 8)
    test = load_dataset(str(path), "test", 24, 12, 8)
    assert train.columns == ["a", "b", "OT"]  # target moved last, as upstream
    assert len(train.data) == 280 and len(val.data) == 400 - 280 - 80 + 24
    assert len(test.data) == 80 + 24
    assert len(train) == (280 - 24 - 8 + 1) * 3
    single = load_dataset(str(path), "train", 24, 12, 8, features="S")
    assert single.columns == ["OT"] and len(single) == 280 - 24 - 8 + 1


def test_percent_few_shot_truncates_train_only():
    full = load_dataset("ETTh1", "train", 96, 48, 24)
    ten = load_dataset("ETTh1", "train", 96, 48, 24, percent=10)
    assert len(ten.data) == (8640 - 96) * 10 // 100 + 96
    assert len(ten) < len(full)
    assert len(load_dataset("ETTh1", "val", 96, 48, 24, percent=10)) == len(
        load_dataset("ETTh1", "val", 96, 48, 24)
    )


def test_unbundled_ett_minute_gives_one_line_hint():
    with pytest.raises(ConfigError, match="not bundled.*ETTm1.csv") as info:
        load_dataset("ETTm1", "train", 96, 48, 24)
    assert "\n" not in str(info.value)


def test_ett_minute_layout_from_path(tmp_path):
    dates = pd.date_range("2016-07-01", periods=20 * 30 * 24 * 4, freq="15min")
    df = pd.DataFrame({"date": dates, "HUFL": np.sin(np.arange(len(dates))), "OT": 1.0})
    path = tmp_path / "ETTm2.csv"
    df.to_csv(path, index=False)
    train = load_dataset(str(path), "train", 96, 48, 96, timeenc=0)
    assert train.layout == "ett_minute" and len(train.data) == 12 * 30 * 24 * 4
    assert train.stamp.shape[1] == 5  # minute // 15 column
    np.testing.assert_array_equal(train.stamp[:2, 4], [0, 1])


def test_bad_inputs_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match="neither"):
        load_dataset("nope.csv", "train", 96, 48, 24)
    with pytest.raises(ConfigError, match="features"):
        load_dataset("ETTh1", "train", 96, 48, 24, features="X")
    with pytest.raises(ConfigError, match="split"):
        load_dataset("ETTh1", "dev", 96, 48, 24)  # type: ignore[arg-type]
    path, _ = _custom_csv(tmp_path, rows=50)
    with pytest.raises(ConfigError, match="exceeds"):
        load_dataset(str(path), "test", 24, 12, 20)
    with pytest.raises(ConfigError, match="too short"):
        load_dataset(str(path), "val", 40, 12, 8)


def test_descriptions_are_dataset_specific():
    texts = {name: dataset_description(name) for name in ("ETTh1", "ETTh2", "ETTm1", "ETTm2")}
    assert len(set(texts.values())) == 4 and texts == DESCRIPTIONS
    assert "every hour" in texts["ETTh1"] and "15 minutes" in texts["ETTm2"]
    assert dataset_description("/data/ETTm1.csv") == texts["ETTm1"]
    assert dataset_description("/data/sales.csv") == GENERIC_DESCRIPTION
    assert dataset_description("Weather").startswith("Weather is recorded every 10 minutes")
    assert prompt_bank_text("ETT").endswith("The train/val/test is 12/4/4 months.\n\n")


def test_loader_shuffles_train_not_test():
    cfg = get_preset("tiny-cpu")
    _, train_loader = data_provider(cfg, "train")
    _, test_loader = data_provider(cfg, "test")
    assert train_loader.drop_last and test_loader.drop_last
    assert type(train_loader.sampler).__name__ == "RandomSampler"
    assert type(test_loader.sampler).__name__ == "SequentialSampler"
