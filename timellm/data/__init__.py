"""Time-LLM data: ETT and custom-CSV windows with upstream's borders, scaling and indexing."""

from __future__ import annotations

from timellm.data.descriptions import (
    DESCRIPTIONS,
    GENERIC_DESCRIPTION,
    dataset_description,
    prompt_bank_text,
)
from timellm.data.loading import (
    BUNDLED,
    bundled_path,
    data_provider,
    dataset_for,
    load_dataset,
    resolve,
)
from timellm.data.scaler import StandardScaler
from timellm.data.timefeatures import time_features
from timellm.data.windows import ForecastWindows, WindowSpec, split_borders

__all__ = [
    "BUNDLED",
    "DESCRIPTIONS",
    "GENERIC_DESCRIPTION",
    "ForecastWindows",
    "StandardScaler",
    "WindowSpec",
    "bundled_path",
    "data_provider",
    "dataset_for",
    "dataset_description",
    "load_dataset",
    "prompt_bank_text",
    "resolve",
    "split_borders",
    "time_features",
]
