"""The frozen LLM: loading it offline-first, freezing it, and fingerprinting it.

Upstream downloads ``huggyllama/llama-7b`` / ``openai-community/gpt2`` /
``google-bert/bert-base-uncased`` when they are not cached. We never touch the network unless
asked (``allow_download=True``): a missing model is a one-line :class:`ConfigError` saying how
to fetch it. Tiny random backbones (``tiny-gpt2``, ``tiny-llama``, ``tiny-bert``) need nothing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ckptkit.errors import ConfigError, MissingDependencyError, install_hint
from timellm.model.tiny import TINY_BACKBONES, tiny_backbone

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
QUANTIZE = (None, "4bit", "8bit")

# Short names (and upstream's --llm_model values) for the hub repositories upstream uses.
ALIASES: dict[str, str] = {
    "gpt2": "openai-community/gpt2",
    "GPT2": "openai-community/gpt2",
    "bert": "google-bert/bert-base-uncased",
    "bert-base-uncased": "google-bert/bert-base-uncased",
    "BERT": "google-bert/bert-base-uncased",
    "llama-7b": "huggyllama/llama-7b",
    "LLAMA": "huggyllama/llama-7b",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
}
_GATED = ("meta-llama/",)


@dataclass
class Backbone:
    """A frozen LLM with its tokenizer."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    dtype: torch.dtype
    quantize: str | None = None

    @property
    def d_llm(self) -> int:
        return int(self.model.config.hidden_size)

    def fingerprint(self) -> dict[str, Any]:
        return backbone_fingerprint(self.model, self.tokenizer, self.name, self.quantize)


def load_backbone(
    name_or_path: str,
    llm_layers: int,
    dtype: str = "fp32",
    quantize: str | None = None,
    *,
    allow_download: bool = False,
    device_map: Any = None,
    seed: int = 0,
) -> Backbone:
    """Load a frozen backbone truncated to its first ``llm_layers`` layers.

    ``name_or_path``: a tiny name (``tiny-gpt2``/``tiny-llama``/``tiny-bert``), an alias from
    :data:`ALIASES`, a hub id already in the local Hugging Face cache, or a local directory.
    ``dtype``: "fp32", "bf16" or "fp16" — the frozen weights' dtype and the compute dtype.
    ``quantize``: None, "4bit" or "8bit" (bitsandbytes; needs CUDA). ``seed`` only affects
    tiny backbones. Every parameter of the returned model has ``requires_grad=False``.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantize not in QUANTIZE:
        raise ConfigError(f"quantize: must be None, '4bit' or '8bit', got {quantize!r}")
    if not isinstance(llm_layers, int) or llm_layers < 1:
        raise ConfigError(f"llm_layers: must be a positive int, got {llm_layers!r}")
    if name_or_path in TINY_BACKBONES:
        if quantize:
            raise ConfigError("quantize: tiny backbones are built in memory; use quantize=None")
        model, tokenizer = tiny_backbone(name_or_path.removeprefix("tiny-"), llm_layers, seed=seed)
        model = model.to(DTYPES[dtype])
    else:
        model, tokenizer = _load_pretrained(
            name_or_path, llm_layers, DTYPES[dtype], quantize, allow_download, device_map
        )
    _set_pad_token(tokenizer)
    model.config.use_cache = False  # no KV cache: we run whole sequences, never generate
    model.requires_grad_(False)
    return Backbone(model, tokenizer, name_or_path, DTYPES[dtype], quantize)


def _set_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    # Upstream: pad with eos when the tokenizer has one, else add "[PAD]".
    if tokenizer.eos_token:
        tokenizer.pad_token = tokenizer.eos_token
    elif tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})


def _unavailable(repo: str, exc: Exception) -> ConfigError:
    login = "huggingface-cli login (gated model), then " if repo.startswith(_GATED) else ""
    return ConfigError(
        f"backbone {repo!r} is not available offline ({type(exc).__name__}); "
        f"fetch it once with: {login}huggingface-cli download {repo} — or pass a local directory"
    )


def _quantization_config(quantize: str | None, dtype: torch.dtype) -> Any:
    if quantize is None:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingDependencyError(
            f"quantize={quantize!r} needs bitsandbytes: {install_hint('quant', 'bitsandbytes')}"
        )
    if not torch.cuda.is_available():
        raise ConfigError(f"quantize: {quantize} loading needs a CUDA GPU; use quantize=None")
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    # transformers renamed torch_dtype= to dtype= in 4.56; accept both lines.
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _load_pretrained(
    name_or_path: str,
    llm_layers: int,
    dtype: torch.dtype,
    quantize: str | None,
    allow_download: bool,
    device_map: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    repo = (
        name_or_path
        if Path(name_or_path).expanduser().is_dir()
        else ALIASES.get(name_or_path, name_or_path)
    )
    local_only = not allow_download
    try:
        config = AutoConfig.from_pretrained(repo, local_files_only=local_only)
        tokenizer = AutoTokenizer.from_pretrained(repo, local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise _unavailable(repo, exc) from exc
    total = getattr(config, "num_hidden_layers", None)
    if total is not None and llm_layers > total:
        raise ConfigError(f"llm_layers: {repo} has {total} layers, asked for {llm_layers}")
    config.num_hidden_layers = llm_layers  # from_pretrained then loads only these layers
    quant = _quantization_config(quantize, dtype)
    if quant is not None and device_map is None:
        device_map = {"": torch.cuda.current_device()}
    previous = transformers.logging.get_verbosity()
    bars_were_off = not transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # truncation makes it list every unused weight
    transformers.utils.logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(
            repo,
            config=config,
            local_files_only=local_only,
            quantization_config=quant,
            device_map=device_map,
            **_dtype_kwarg(dtype),
        )
    except OSError as exc:
        raise _unavailable(repo, exc) from exc
    finally:
        transformers.logging.set_verbosity(previous)
        if not bars_were_off:
            transformers.utils.logging.enable_progress_bar()
    return model, tokenizer


# --- fingerprint -------------------------------------------------------------------------------

# Config keys that vary with how a model was loaded, not with what it computes.
_VOLATILE = {
    "transformers_version", "torch_dtype", "dtype", "quantization_config", "architectures",
    "output_attentions", "output_hidden_states", "use_cache", "return_dict",
    "attn_implementation", "name_or_path",
}  # fmt: skip
_TOKENIZER_PROBE = "Dataset description: forecast the next 96 steps; min value -0.125, lags [1, 24]"


def _config_hash(model: PreTrainedModel) -> str:
    cfg = {
        k: v
        for k, v in model.config.to_dict().items()
        if k not in _VOLATILE and not k.startswith("_")
    }
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().reshape(-1)
    if t.is_floating_point():
        # Rounded to bf16 so the same checkpoint loaded as fp32 or bf16 hashes the same.
        t = t.to(torch.bfloat16).view(torch.int16)
    return t.cpu().numpy().tobytes()


def _weights_hash(model: PreTrainedModel) -> str:
    h = hashlib.sha256()
    emb = model.get_input_embeddings().weight
    rows = torch.linspace(0, emb.shape[0] - 1, 16).long().to(emb.device)
    h.update(_tensor_bytes(emb.index_select(0, rows)))
    for name, p in model.named_parameters():  # a small slice of every tensor, in order
        h.update(name.encode())
        h.update(_tensor_bytes(p.reshape(-1)[:64]))
    return h.hexdigest()


def _tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    ids = tokenizer(_TOKENIZER_PROBE)["input_ids"]
    return hashlib.sha256(json.dumps([len(tokenizer), ids]).encode()).hexdigest()


def backbone_fingerprint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    quantize: str | None = None,
) -> dict[str, Any]:
    """What identifies a frozen backbone, for refusing a resume onto a different one.

    Compare ``digest``: it covers the architecture/config (``config_hash``, including the
    truncated layer count), a sample of the weights (``weights_hash``: some rows of the input
    embedding and the first elements of every parameter) and the tokenizer. ``name``, ``dtype``
    and ``quantize`` are informational; the digest does not change when the same weights are
    loaded under another name or as fp32 vs bf16, but does for a 4/8-bit load.
    """
    parts = {
        "config_hash": _config_hash(model),
        "weights_hash": _weights_hash(model),
        "tokenizer_hash": _tokenizer_hash(tokenizer),
    }
    digest = hashlib.sha256("|".join(parts[k] for k in sorted(parts)).encode()).hexdigest()
    return {
        "name": name,
        "model_type": model.config.model_type,
        "num_layers": getattr(model.config, "num_hidden_layers", None),
        "hidden_size": model.config.hidden_size,
        "vocab_size": model.get_input_embeddings().weight.shape[0],
        "dtype": str(model.get_input_embeddings().weight.dtype).removeprefix("torch."),
        "quantize": quantize,
        **parts,
        "digest": digest,
    }
