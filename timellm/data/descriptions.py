"""Dataset descriptions: the "Dataset description" part of Time-LLM's prompt-as-prefix.

Upstream Time-LLM reads one shared file (``prompt_bank/ETT.txt``) for all four ETT subsets.
We keep that file unmodified and write a description per subset, so the prompt tells the LLM
what it is actually looking at (sampling rate, which transformer, length). The texts are part of
the model input: changing one changes every prompt, so treat them as versioned data.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ckptkit.errors import ConfigError

_ETT_INTRO = (
    "The Electricity Transformer Temperature (ETT) is a crucial indicator in the electric power "
    "long-term deployment."
)
_ETT_FIELDS = (
    'Each data point consists of the target value "oil temperature" (OT) and 6 power load '
    "features: high, middle and low useful load and high, middle and low useless load. "
    "The train/val/test split is 12/4/4 months."
)


def _ett(name: str, region: str, rate: str, points: str) -> str:
    return (
        f"{_ETT_INTRO} {name} records the electricity transformer of the {region} of two regions "
        f"of a province in China, sampled {rate} from July 2016 to June 2018 ({points} points). "
        f"{_ETT_FIELDS}"
    )


DESCRIPTIONS: dict[str, str] = {
    "ETTh1": _ett("ETTh1", "first", "every hour", "17,420"),
    "ETTh2": _ett("ETTh2", "second", "every hour", "17,420"),
    "ETTm1": _ett("ETTm1", "first", "every 15 minutes", "69,680"),
    "ETTm2": _ett("ETTm2", "second", "every 15 minutes", "69,680"),
}

GENERIC_DESCRIPTION = (
    "This dataset is a multivariate time series sampled at a regular interval and read from a "
    "CSV file. Each variable is forecast separately from its own recent history."
)

# Upstream prompt-bank files usable as-is (ECL, Traffic, Weather, m4, and the shared ETT one).
_PROMPT_BANK = ("ECL", "ETT", "Traffic", "Weather", "m4")


def prompt_bank_text(name: str) -> str:
    """The upstream prompt-bank text ``name``, byte for byte as upstream's ``load_content``
    reads it (trailing blank lines included: they are part of upstream's prompts)."""
    if name not in _PROMPT_BANK:
        raise ConfigError(f"no prompt-bank entry {name!r}; known: {', '.join(_PROMPT_BANK)}")
    path = resources.files("timellm") / "datasets" / "prompt_bank" / f"{name}.txt"
    return path.read_text(encoding="utf-8")  # text mode, as upstream's open(..., "r")


def upstream_domain_text(name_or_path: str) -> str:
    """What upstream's ``--prompt_domain 1`` puts in the prompt for a dataset: ``ETT.txt``
    for any ETT subset, else the prompt-bank file named like the dataset."""
    stem = Path(name_or_path).stem if name_or_path.endswith(".csv") else name_or_path
    if "ETT" in stem:
        return prompt_bank_text("ETT")
    if stem in _PROMPT_BANK:
        return prompt_bank_text(stem)
    raise ConfigError(
        f"upstream has no prompt-bank text for {name_or_path!r} (it has {', '.join(_PROMPT_BANK)}); "
        "pass description=... (--description) or prompt_domain=False"
    )


def dataset_description(name_or_path: str) -> str:
    """Description text for a dataset name ("ETTh1", "Weather", ...) or a CSV path.

    An ETT file passed by path (``.../ETTm1.csv``) gets its subset's description; any other CSV
    gets :data:`GENERIC_DESCRIPTION`.
    """
    stem = Path(name_or_path).stem if name_or_path.endswith(".csv") else name_or_path
    if stem in DESCRIPTIONS:
        return DESCRIPTIONS[stem]
    if stem in _PROMPT_BANK:
        return prompt_bank_text(stem)
    return GENERIC_DESCRIPTION
