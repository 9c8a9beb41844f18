"""Time-LLM model: layers, prompt encoder, backbones, presets."""

from __future__ import annotations

from timellm.model.backbone import ALIASES, DTYPES, Backbone, backbone_fingerprint, load_backbone
from timellm.model.presets import DEFAULT_PRESET, PRESETS, TimeLLMConfig, get_preset
from timellm.model.prompt import (
    PromptEncoder,
    build_prompts_reference,
    format_prompts,
    prompt_statistics,
    tokenize_reference,
)
from timellm.model.timellm import TimeLLM, TrainableState, build_model, resolve_description
from timellm.model.tiny import TINY_BACKBONES, tiny_backbone, tiny_tokenizer

__all__ = [
    "ALIASES",
    "DEFAULT_PRESET",
    "DTYPES",
    "PRESETS",
    "TINY_BACKBONES",
    "Backbone",
    "PromptEncoder",
    "TimeLLM",
    "TimeLLMConfig",
    "TrainableState",
    "backbone_fingerprint",
    "build_model",
    "build_prompts_reference",
    "format_prompts",
    "get_preset",
    "load_backbone",
    "prompt_statistics",
    "resolve_description",
    "tiny_backbone",
    "tiny_tokenizer",
    "tokenize_reference",
]
