"""Time-LLM configuration and named presets.

Presets (``get_preset(name)``; override fields with ``cfg.replace(...)``):

``tiny-cpu`` (default)
    Random 2-layer GPT-2-shaped backbone (hidden 64, ~365-token offline tokenizer), ETTh1,
    seq_len 96 -> pred_len 24, d_model 16, d_ff 32, 100 text prototypes, batch 32, fp32.
    Needs no download and no GPU; < 1 GB RAM. About 0.15-0.2 s per training step on 2 CPU
    cores (``bench/results/timellm_step.md``), so ``max_steps=300`` takes about a minute.

``gpt2-etth1``
    GPT-2 small (``openai-community/gpt2``, from a local path or the HF cache), first 6 layers,
    ETTh1 512 -> 96, d_model 32, d_ff 128, batch 24, lr 0.01 (upstream ``TimeLLM_ETTh1.sh``
    hyper-parameters; upstream's default ``--llm_layers 6``), bf16. Estimated GPU memory
    ~3-4 GB (the trainable ``mapping_layer`` 50257 -> 1000 is 50 M fp32 params: ~0.8 GB with
    its gradient and Adam moments). On CPU it runs, slowly (fp32: set ``dtype="fp32"``).

``llama3-8b-4bit-etth1``
    Meta-Llama-3-8B in 4-bit NF4 (bitsandbytes, CUDA only), all 32 layers as upstream's ETTh1
    script, ETTh1 512 -> 96, d_model 32, d_ff 128, batch 4, bf16, gradient checkpointing on.
    Estimated ~9-11 GB GPU: ~5.5 GB weights (embeddings stay bf16), ~2 GB for the 128 M-param
    ``mapping_layer`` with gradient and Adam moments, the rest activations. Aimed at a Colab
    L4/A100; on a 16 GB T4 (no fast bf16) use ``dtype="fp16"`` (the trainer must then use a
    GradScaler) and expect to step down the ladder below. Gated model: ``huggingface-cli
    login`` and accept the licence before ``huggingface-cli download``.

These memory figures are estimates from parameter counts, not measurements.

OOM ladder, in order (each step keeps the model's math, only the problem size changes):

1. ``batch_size``: halve it, down to 1 (also lower ``learning_rate`` roughly in proportion).
2. ``gradient_checkpointing=True``: recompute the LLM's activations in backward.
3. ``llm_layers``: 32 -> 16 -> 8 (upstream's own knob; a different backbone fingerprint).
4. ``seq_len``: 512 -> 336 -> 96 (fewer patch tokens through the LLM).
5. ``d_ff``: 128 -> 32 (smaller reprogramming keys and output head; minor saving).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ckptkit.errors import ConfigError

DTYPE_NAMES = ("fp32", "bf16", "fp16")
COMPAT = (None, "upstream")
LRADJ = ("type1", "type2", "type3", "PEMS", "TST", "constant", "COS")


def _bad(name: str, why: str, value: Any) -> ConfigError:
    return ConfigError(f"TimeLLMConfig.{name}: {why}, got {value!r}")


@dataclass(frozen=True)
class TimeLLMConfig:
    """Everything that defines a Time-LLM run. Validates itself on creation and on
    :meth:`replace`; a bad value raises :class:`ckptkit.errors.ConfigError` naming the field.

    Model fields mirror upstream's ``run_main.py`` arguments. Training fields (batch size,
    learning rate, epochs, schedule) are read by the trainer, not the model.
    """

    name: str = "custom"
    # None: ckptkit's training semantics; "upstream": upstream run_main.py's, step for step
    # (learning rates, per-epoch validation and early stopping, prompt defaults).
    compat: str | None = None
    # backbone
    llm: str = "tiny-gpt2"
    llm_layers: int = 2
    llm_dim: int | None = None  # upstream's --llm_dim: checked against the backbone's size
    dtype: str = "fp32"  # frozen-LLM weights and autocast compute dtype
    quantize: str | None = None  # None | "4bit" | "8bit" (bitsandbytes, CUDA)
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the numeric core (prompt tokenization stays eager)
    allow_download: bool = False  # only then may a missing backbone be fetched from the hub
    # data
    data: str = "ETTh1"  # "ETTh1" | "ETTh2" | "ETTm1" | "ETTm2" | path to a CSV
    features: str = "M"
    target: str = "OT"
    seq_len: int = 96
    label_len: int = 48
    pred_len: int = 24
    timeenc: int = 1  # upstream default (--embed timeF)
    freq: str | None = None  # None: "t" for ETTm, else "h"
    percent: int = 100  # few-shot: % of training windows kept
    num_workers: int = 0
    # model
    d_model: int = 16
    d_ff: int = 32
    n_heads: int = 8
    dropout: float = 0.1
    patch_len: int = 16
    stride: int = 8
    num_tokens: int = 1000  # text prototypes produced by mapping_layer
    # True: a description of the dataset (ours per ETT subset; under compat upstream's
    # prompt-bank text, byte for byte); False: upstream's fixed one-sentence ETT
    # description. None: the mode's default (True; False under compat="upstream", as
    # upstream's --prompt_domain 0).
    prompt_domain: bool | None = None
    description: str | None = None  # overrides the dataset's description
    # training (read by the trainer)
    batch_size: int = 32
    learning_rate: float = 0.01
    train_epochs: int = 10
    max_steps: int | None = None  # stop after this many optimizer steps (None: epochs decide)
    patience: int = 10
    lradj: str = "type1"
    pct_start: float = 0.2
    seed: int = 2021

    def __post_init__(self) -> None:
        for name in (
            "llm_layers", "seq_len", "pred_len", "d_model", "d_ff", "n_heads", "patch_len",
            "stride", "num_tokens", "batch_size", "train_epochs", "patience",
        ):  # fmt: skip
            _positive_int(name, getattr(self, name))
        _check(self)

    def replace(self, **changes: Any) -> TimeLLMConfig:
        """A validated copy with ``changes`` applied."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"TimeLLMConfig has no field(s) {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TimeLLMConfig:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"TimeLLMConfig has no field(s) {', '.join(sorted(unknown))}")
        return cls(**data)

    @property
    def domain_prompt(self) -> bool:
        """Whether prompts describe the dataset (``prompt_domain`` resolved for the mode)."""
        if self.prompt_domain is None:
            return self.compat != "upstream"
        return self.prompt_domain

    @property
    def patch_nums(self) -> int:
        """Patch tokens per series (upstream's formula; the end is padded by ``stride``)."""
        return int((self.seq_len - self.patch_len) / self.stride + 2)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(name, "must be a positive int", value)


def _check(c: TimeLLMConfig) -> None:
    if not isinstance(c.label_len, int) or not 0 <= c.label_len <= c.seq_len:
        raise _bad("label_len", f"must be an int in [0, seq_len={c.seq_len}]", c.label_len)
    if c.seq_len < c.patch_len:
        raise _bad("seq_len", f"must be >= patch_len ({c.patch_len})", c.seq_len)
    if c.compat not in COMPAT:
        raise _bad("compat", "must be None or 'upstream'", c.compat)
    if c.prompt_domain not in (None, True, False):
        raise _bad("prompt_domain", "must be True, False or None", c.prompt_domain)
    if c.llm_dim is not None:
        _positive_int("llm_dim", c.llm_dim)
    if c.dtype not in DTYPE_NAMES:
        raise _bad("dtype", f"must be one of {DTYPE_NAMES}", c.dtype)
    if c.quantize not in (None, "4bit", "8bit"):
        raise _bad("quantize", "must be None, '4bit' or '8bit'", c.quantize)
    if c.features not in ("M", "S", "MS"):
        raise _bad("features", "must be 'M', 'S' or 'MS'", c.features)
    if c.timeenc not in (0, 1):
        raise _bad("timeenc", "must be 0 or 1", c.timeenc)
    if isinstance(c.percent, bool) or not isinstance(c.percent, int) or not 1 <= c.percent <= 100:
        raise _bad("percent", "must be an int in [1, 100]", c.percent)
    if not isinstance(c.dropout, (int, float)) or not 0.0 <= c.dropout < 1.0:
        raise _bad("dropout", "must be in [0, 1)", c.dropout)
    if not isinstance(c.learning_rate, (int, float)) or not c.learning_rate > 0:
        raise _bad("learning_rate", "must be > 0", c.learning_rate)
    if not isinstance(c.pct_start, (int, float)) or not 0.0 < c.pct_start < 1.0:
        raise _bad("pct_start", "must be in (0, 1)", c.pct_start)
    if c.lradj not in LRADJ:
        raise _bad("lradj", f"must be one of {LRADJ}", c.lradj)
    if c.max_steps is not None:
        _positive_int("max_steps", c.max_steps)
    if not isinstance(c.num_workers, int) or c.num_workers < 0:
        raise _bad("num_workers", "must be an int >= 0", c.num_workers)
    if not isinstance(c.llm, str) or not c.llm:
        raise _bad("llm", "must be a backbone name or path", c.llm)
    if not isinstance(c.data, str) or not c.data:
        raise _bad("data", "must be a dataset name or CSV path", c.data)
    if c.description is not None and not isinstance(c.description, str):
        raise _bad("description", "must be a string or None", c.description)


PRESETS: dict[str, TimeLLMConfig] = {
    "tiny-cpu": TimeLLMConfig(
        name="tiny-cpu",
        llm="tiny-gpt2",
        llm_layers=2,
        seq_len=96,
        label_len=48,
        pred_len=24,
        d_model=16,
        d_ff=32,
        num_tokens=100,
        batch_size=32,
        learning_rate=0.01,
        train_epochs=1,
        max_steps=300,
        dtype="fp32",
    ),
    "gpt2-etth1": TimeLLMConfig(
        name="gpt2-etth1",
        llm="openai-community/gpt2",
        llm_layers=6,
        seq_len=512,
        label_len=48,
        pred_len=96,
        d_model=32,
        d_ff=128,
        batch_size=24,
        learning_rate=0.01,
        train_epochs=100,
        dtype="bf16",
    ),
    "llama3-8b-4bit-etth1": TimeLLMConfig(
        name="llama3-8b-4bit-etth1",
        llm="meta-llama/Meta-Llama-3-8B",
        llm_layers=32,
        seq_len=512,
        label_len=48,
        pred_len=96,
        d_model=32,
        d_ff=128,
        batch_size=4,
        learning_rate=0.01,
        train_epochs=10,
        dtype="bf16",
        quantize="4bit",
        gradient_checkpointing=True,
    ),
}
DEFAULT_PRESET = "tiny-cpu"


def get_preset(name: str = DEFAULT_PRESET, **overrides: Any) -> TimeLLMConfig:
    """Preset ``name``, with ``overrides`` applied (validated)."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
