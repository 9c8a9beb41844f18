"""Calendar features per time step, as upstream Time-LLM (Informer lineage) encodes them.

``timeenc=0``: integer calendar fields (month, day, weekday, hour[, minute // 15]).
``timeenc=1``: the "timeF" encoding, each field scaled to [-0.5, 0.5], chosen by frequency.
Time-LLM itself never reads these marks; we produce them so loaders and loops stay
interchangeable with the upstream ones.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from pandas.tseries import offsets
from pandas.tseries.frequencies import to_offset

from ckptkit.errors import ConfigError

_Feature = Callable[[pd.DatetimeIndex], np.ndarray]


def _second_of_minute(i: pd.DatetimeIndex) -> np.ndarray:
    return i.second / 59.0 - 0.5


def _minute_of_hour(i: pd.DatetimeIndex) -> np.ndarray:
    return i.minute / 59.0 - 0.5


def _hour_of_day(i: pd.DatetimeIndex) -> np.ndarray:
    return i.hour / 23.0 - 0.5


def _day_of_week(i: pd.DatetimeIndex) -> np.ndarray:
    return i.day_of_week / 6.0 - 0.5


def _day_of_month(i: pd.DatetimeIndex) -> np.ndarray:
    return (i.day - 1) / 30.0 - 0.5


def _day_of_year(i: pd.DatetimeIndex) -> np.ndarray:
    return (i.day_of_year - 1) / 365.0 - 0.5


def _month_of_year(i: pd.DatetimeIndex) -> np.ndarray:
    return (i.month - 1) / 11.0 - 0.5


def _week_of_year(i: pd.DatetimeIndex) -> np.ndarray:
    return (i.isocalendar().week.to_numpy() - 1) / 52.0 - 0.5


_DAILY = [_day_of_week, _day_of_month, _day_of_year]
# Checked in order with isinstance, so subclasses (BusinessDay is a Day-like offset) come first.
_BY_OFFSET: list[tuple[type, list[_Feature]]] = [
    (offsets.YearEnd, []),
    (offsets.QuarterEnd, [_month_of_year]),
    (offsets.MonthEnd, [_month_of_year]),
    (offsets.Week, [_day_of_month, _week_of_year]),
    (offsets.BusinessDay, _DAILY),
    (offsets.Day, _DAILY),
    (offsets.Hour, [_hour_of_day, *_DAILY]),
    (offsets.Minute, [_minute_of_hour, _hour_of_day, *_DAILY]),
    (offsets.Second, [_second_of_minute, _minute_of_hour, _hour_of_day, *_DAILY]),
]
# Upstream's one-letter aliases; pandas >= 2.2 renamed some (H -> h, T -> min, S -> s).
_ALIASES = {"h": "h", "t": "min", "s": "s", "d": "D", "b": "B", "w": "W", "m": "ME", "a": "YE"}


def _features_for(freq: str) -> list[_Feature]:
    try:
        offset = to_offset(_ALIASES.get(freq.lower(), freq))
    except ValueError as exc:
        raise ConfigError(f"freq: unknown frequency {freq!r} ({exc})") from None
    for kind, feats in _BY_OFFSET:
        if isinstance(offset, kind):
            return feats
    raise ConfigError(f"freq: unsupported frequency {freq!r}; use one of s, t, h, d, b, w, m")


def time_features(
    dates: pd.Series, timeenc: int, freq: str, minute_field: bool = False
) -> np.ndarray:
    """Array ``[len(dates), n_features]`` (float32) of calendar features.

    ``minute_field`` adds upstream's ``minute // 15`` column to ``timeenc=0`` (the ETT minute
    loader does, the custom loader does not).
    """
    stamps = pd.DatetimeIndex(pd.to_datetime(dates))
    if timeenc == 0:
        cols = [stamps.month, stamps.day, stamps.day_of_week, stamps.hour]
        if minute_field:
            cols.append(stamps.minute // 15)
        return np.stack([np.asarray(c) for c in cols], axis=1).astype(np.float32)
    if timeenc == 1:
        feats = _features_for(freq)
        if not feats:
            return np.zeros((len(stamps), 0), dtype=np.float32)
        return np.stack([np.asarray(f(stamps)) for f in feats], axis=1).astype(np.float32)
    raise ConfigError(f"timeenc: must be 0 or 1, got {timeenc!r}")
