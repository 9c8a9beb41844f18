"""Sliding-window forecasting datasets with upstream Time-LLM's exact borders and indexing.

Time-LLM is channel independent: a sample is ONE variable's window. Index ``i`` maps to
``(feature_id, start) = divmod(i, windows_per_feature)``, so the dataset length is
``(len(split) - seq_len - pred_len + 1) * n_features`` — with ETTh1, seq_len 512, pred_len 96,
features "M" that is 56,231 / 19,495 / 19,495 samples for train / val / test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from torch.utils.data import Dataset

from ckptkit.errors import ConfigError
from timellm.data.scaler import StandardScaler
from timellm.data.timefeatures import time_features

Split = Literal["train", "val", "test"]
Layout = Literal["ett_hour", "ett_minute", "custom"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
LAYOUTS: tuple[Layout, ...] = ("ett_hour", "ett_minute", "custom")
FEATURES = ("M", "S", "MS")

_MONTH_HOURS = 30 * 24


@dataclass(frozen=True)
class WindowSpec:
    """What a window looks like; validates itself."""

    seq_len: int
    label_len: int
    pred_len: int
    features: str = "M"
    target: str = "OT"
    scale: bool = True
    timeenc: int = 1
    freq: str = "h"
    percent: int = 100

    def __post_init__(self) -> None:
        for name in ("seq_len", "pred_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}: must be a positive int, got {value!r}")
        if not isinstance(self.label_len, int) or not 0 <= self.label_len <= self.seq_len:
            raise ConfigError(f"label_len: must be an int in [0, seq_len], got {self.label_len!r}")
        if self.features not in FEATURES:
            raise ConfigError(f"features: must be one of {FEATURES}, got {self.features!r}")
        if self.timeenc not in (0, 1):
            raise ConfigError(f"timeenc: must be 0 or 1, got {self.timeenc!r}")
        if not isinstance(self.percent, int) or not 1 <= self.percent <= 100:
            raise ConfigError(f"percent: must be an int in [1, 100], got {self.percent!r}")


def split_borders(layout: Layout, n_rows: int, seq_len: int) -> tuple[list[int], list[int]]:
    """Start/end rows of train/val/test. Val and test start ``seq_len`` early so their first
    window has a full lookback (the upstream overlap)."""
    if layout == "custom":
        num_train, num_test = int(n_rows * 0.7), int(n_rows * 0.2)
        num_val = n_rows - num_train - num_test
        starts = [0, num_train - seq_len, n_rows - num_test - seq_len]
        ends = [num_train, num_train + num_val, n_rows]
        return starts, ends
    unit = _MONTH_HOURS * (4 if layout == "ett_minute" else 1)
    # ETT: 12 months train, 4 val, 4 test; rows after month 20 are unused, as upstream.
    starts = [0, 12 * unit - seq_len, 16 * unit - seq_len]
    ends = [12 * unit, 16 * unit, 20 * unit]
    return starts, ends


def _select_columns(df: pd.DataFrame, layout: Layout, spec: WindowSpec) -> pd.DataFrame:
    if "date" not in df.columns:
        raise ConfigError("data: the CSV needs a 'date' column (first column, parseable dates)")
    if spec.target not in df.columns:
        raise ConfigError(f"target: column {spec.target!r} not in the CSV ({list(df.columns)})")
    if layout == "custom":
        # Upstream Dataset_Custom moves the target to the last column.
        others = [c for c in df.columns if c not in ("date", spec.target)]
        df = df[["date", *others, spec.target]]
    if spec.features == "S":
        return df[[spec.target]]
    return df[df.columns[1:]]


class ForecastWindows(Dataset):
    """One split of a CSV as channel-independent windows.

    ``ds[i]`` is ``(seq_x [seq_len, 1], seq_y [label_len + pred_len, 1], seq_x_mark, seq_y_mark)``
    as float32 numpy arrays, identical in value to upstream's ``__getitem__`` (upstream scales in
    float64 and the loop casts to float32; we cast once at load).
    """

    def __init__(self, frame: pd.DataFrame, layout: Layout, split: Split, spec: WindowSpec):
        if layout not in LAYOUTS:
            raise ConfigError(f"layout: must be one of {LAYOUTS}, got {layout!r}")
        if split not in SPLITS:
            raise ConfigError(f"split: must be one of {SPLITS}, got {split!r}")
        self.layout, self.split, self.spec = layout, split, spec
        data = _select_columns(frame, layout, spec)
        self.columns: list[str] = list(data.columns)
        starts, ends = split_borders(layout, len(frame), spec.seq_len)
        if min(starts) < 0 or ends[-1] > len(frame):
            raise ConfigError(
                f"data: {len(frame)} rows are too short for the {layout} split with seq_len "
                f"{spec.seq_len}; use a shorter seq_len or a longer CSV"
            )
        k = SPLITS.index(split)
        start, end = starts[k], ends[k]
        if split == "train":  # few-shot: keep the first `percent` % of training windows
            end = (end - spec.seq_len) * spec.percent // 100 + spec.seq_len
        values = data.to_numpy(dtype=np.float64)
        self.scaler = StandardScaler()
        if spec.scale:
            self.scaler.fit(values[starts[0] : ends[0]])
            values = self.scaler.transform(values)
        else:
            self.scaler.fit(np.zeros((1, values.shape[1])))  # identity: mean 0, scale 1
        self.data = np.ascontiguousarray(values[start:end], dtype=np.float32)
        self.stamp = time_features(
            frame["date"].iloc[start:end],
            spec.timeenc,
            spec.freq,
            minute_field=layout == "ett_minute",
        )
        self.n_features = self.data.shape[1]
        self.windows_per_feature = len(self.data) - spec.seq_len - spec.pred_len + 1
        if self.windows_per_feature < 1:
            raise ConfigError(
                f"seq_len + pred_len = {spec.seq_len + spec.pred_len} exceeds the {len(self.data)} "
                f"rows of the {split} split; use shorter windows or a longer CSV"
            )

    # upstream names, for code written against Dataset_ETT_hour
    @property
    def enc_in(self) -> int:
        return self.n_features

    @property
    def tot_len(self) -> int:
        return self.windows_per_feature

    def __len__(self) -> int:
        return self.windows_per_feature * self.n_features

    def locate(self, index: int) -> tuple[int, int]:
        """``(feature_id, start_row)`` of sample ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        return divmod(index, self.windows_per_feature)

    def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
        feat, s_begin = self.locate(index)
        s_end = s_begin + self.spec.seq_len
        r_begin = s_end - self.spec.label_len
        r_end = s_end + self.spec.pred_len
        return (
            self.data[s_begin:s_end, feat : feat + 1],
            self.data[r_begin:r_end, feat : feat + 1],
            self.stamp[s_begin:s_end],
            self.stamp[r_begin:r_end],
        )

    def feature_ids(self, indices: np.ndarray) -> np.ndarray:
        """Feature (column) id of each sample index; feeds :meth:`inverse_transform`."""
        return np.asarray(indices) // self.windows_per_feature

    def inverse_transform(
        self, data: np.ndarray, feature_ids: np.ndarray | None = None
    ) -> np.ndarray:
        """Back to the CSV's units.

        ``data[..., n_features]`` (all columns, upstream's form) needs no ids. Channel-independent
        outputs ``data[B, L, 1]`` need ``feature_ids[B]`` (see :meth:`feature_ids`).
        """
        data = np.asarray(data)
        if feature_ids is None:
            if data.shape[-1] != self.n_features:
                raise ConfigError(
                    f"inverse_transform: last dim {data.shape[-1]} != {self.n_features} features; "
                    "pass feature_ids for channel-independent predictions"
                )
            return self.scaler.inverse_transform(data)
        ids = np.asarray(feature_ids).reshape((-1,) + (1,) * (data.ndim - 1))
        return self.scaler.inverse_transform(data, columns=ids)
