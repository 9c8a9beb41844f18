"""Time-LLM reference model and data (Jin et al., ICLR 2024), for ckptkit's trainer.

    from timellm import get_preset, build_model, data_provider
    cfg = get_preset("tiny-cpu")
    model = build_model(cfg)                      # frozen LLM + trainable reprogramming parts
    train_set, train_loader = data_provider(cfg, "train")
    for x, y, x_mark, y_mark in train_loader:
        pred = model(x.float())                   # [B, pred_len, 1]
        loss = mse(pred, y[:, -cfg.pred_len:].float())

Checkpoint only ``model.trainable_state_dict()`` (or ``model.trainable_state()`` in a ckptkit
state dict) and refuse a resume when ``model.backbone_fingerprint()["digest"]`` differs.
Everything not re-exported here is private.
"""

from __future__ import annotations

from timellm.data import (
    ForecastWindows,
    StandardScaler,
    data_provider,
    dataset_description,
    load_dataset,
)
from timellm.model import (
    DEFAULT_PRESET,
    PRESETS,
    Backbone,
    PromptEncoder,
    TimeLLM,
    TimeLLMConfig,
    TrainableState,
    backbone_fingerprint,
    build_model,
    build_prompts_reference,
    get_preset,
    load_backbone,
)

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "Backbone",
    "ForecastWindows",
    "PromptEncoder",
    "StandardScaler",
    "TimeLLM",
    "TimeLLMConfig",
    "TrainableState",
    "backbone_fingerprint",
    "build_model",
    "build_prompts_reference",
    "data_provider",
    "dataset_description",
    "get_preset",
    "load_backbone",
    "load_dataset",
]
