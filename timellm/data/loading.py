"""Resolve a dataset name or CSV path to :class:`ForecastWindows`, and build DataLoaders."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
import torch
from torch.utils.data import DataLoader, Sampler

from ckptkit.errors import ConfigError
from timellm.data.windows import ForecastWindows, Layout, Split, WindowSpec

if TYPE_CHECKING:
    from timellm.model.presets import TimeLLMConfig

BUNDLED = ("ETTh1", "ETTh2")
ETT_HOUR = ("ETTh1", "ETTh2")
ETT_MINUTE = ("ETTm1", "ETTm2")
ETDATASET_URL = "https://github.com/zhouhaoyi/ETDataset/tree/main/ETT-small"


def bundled_path(name: str) -> Path:
    """Path of a bundled ETT CSV inside the installed package."""
    if name not in BUNDLED:
        raise ConfigError(f"data: {name!r} is not bundled; bundled: {', '.join(BUNDLED)}")
    return Path(str(resources.files("timellm") / "datasets" / "ETT-small" / f"{name}.csv"))


def resolve(name_or_csv_path: str) -> tuple[Path, Layout]:
    """``(csv_path, layout)`` for "ETTh1"/"ETTh2" (bundled) or a path to a CSV.

    The layout follows the file name like upstream's ``--data`` switch: ETTh*/ETTm* files get the
    fixed 12/4/4-month ETT borders, anything else the 70/10/20 custom split.
    """
    name = str(name_or_csv_path)
    if name in BUNDLED:
        return bundled_path(name), "ett_hour"
    if name in ETT_MINUTE:
        raise ConfigError(
            f"data: {name} is not bundled (only {', '.join(BUNDLED)} are); download {name}.csv "
            f"from {ETDATASET_URL} and pass its path, e.g. --data /path/to/{name}.csv"
        )
    path = Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"data: {name!r} is neither a known dataset ({', '.join(BUNDLED)}) nor an existing "
            "CSV file"
        )
    stem = path.stem
    layout: Layout = (
        "ett_hour" if stem in ETT_HOUR else "ett_minute" if stem in ETT_MINUTE else "custom"
    )
    return path, layout


@lru_cache(maxsize=4)
def _read_csv(path: str, mtime_ns: int) -> pd.DataFrame:
    # Cached so building train/val/test parses each file once; mtime in the key catches edits.
    return pd.read_csv(path)


def default_freq(layout: Layout) -> str:
    return "t" if layout == "ett_minute" else "h"


def load_dataset(
    name_or_csv_path: str,
    split: Split,
    seq_len: int,
    label_len: int,
    pred_len: int,
    features: str = "M",
    *,
    target: str = "OT",
    scale: bool = True,
    timeenc: int = 1,
    freq: str | None = None,
    percent: int = 100,
    layout: Layout | Literal["auto"] = "auto",
) -> ForecastWindows:
    """One split of ETTh1/ETTh2 (bundled), ETTm1/ETTm2 or any CSV with a ``date`` column.

    ``timeenc=1`` ("timeF") is upstream's default (``--embed timeF``); ``freq`` defaults to "t"
    for the minute layout and "h" otherwise. ``percent < 100`` keeps only the first part of the
    training windows (few-shot), as upstream.
    """
    path, detected = resolve(name_or_csv_path)
    layout = detected if layout == "auto" else layout
    spec = WindowSpec(
        seq_len=seq_len,
        label_len=label_len,
        pred_len=pred_len,
        features=features,
        target=target,
        scale=scale,
        timeenc=timeenc,
        freq=freq or default_freq(layout),
        percent=percent,
    )
    frame = _read_csv(str(path), path.stat().st_mtime_ns)
    return ForecastWindows(frame, layout, split, spec)


def dataset_for(cfg: TimeLLMConfig, split: Split) -> ForecastWindows:
    """One split of the data a config names (``percent`` trims only train, as upstream)."""
    return load_dataset(
        cfg.data,
        split,
        cfg.seq_len,
        cfg.label_len,
        cfg.pred_len,
        cfg.features,
        target=cfg.target,
        timeenc=cfg.timeenc,
        freq=cfg.freq,
        percent=cfg.percent,
    )


def data_provider(
    cfg: TimeLLMConfig,
    split: Split,
    *,
    shuffle: bool | None = None,
    sampler: Sampler[int] | None = None,
    generator: torch.Generator | None = None,
    **loader_kwargs: Any,
) -> tuple[ForecastWindows, DataLoader]:
    """``(dataset, loader)`` like upstream's ``data_provider(args, flag)``.

    Upstream shuffles train and val, not test, and drops the last partial batch in every split;
    so do we (ETTh1 512/96 at batch 32: 1,757 train steps). Pass ``sampler`` (e.g. a resumable
    one) to replace shuffling.
    """
    dataset = dataset_for(cfg, split)
    if shuffle is None:
        shuffle = split != "test" and sampler is None
    loader_kwargs.setdefault("num_workers", cfg.num_workers)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=shuffle,
        sampler=sampler,
        generator=generator,
        drop_last=True,
        **loader_kwargs,
    )
    return dataset, loader
