"""Small, composable policies: when to save (``save``) and what to keep (``retention``)."""

from ckptkit.policies.retention import KeepBestK, KeepLastN, RetentionPolicy, select_deletions
from ckptkit.policies.save import (
    Deadline,
    EveryNSteps,
    EveryTMinutes,
    SaveTrigger,
    SignalTrigger,
    parse_duration,
)

__all__ = [
    "Deadline",
    "EveryNSteps",
    "EveryTMinutes",
    "KeepBestK",
    "KeepLastN",
    "RetentionPolicy",
    "SaveTrigger",
    "SignalTrigger",
    "parse_duration",
    "select_deletions",
]
