"""Offline tiny backbones: a deterministic tokenizer and seeded random GPT-2/Llama/BERT models.

Nothing here touches the network or the Hugging Face cache, so tests and the ``tiny-cpu`` preset
run anywhere. Two processes that build the same tiny backbone get bit-identical frozen weights
(seeded init inside a forked RNG, so the caller's RNG stream is not disturbed).
"""

from __future__ import annotations

import itertools
import re
import string
from importlib import resources

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaModel,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from timellm.data.descriptions import DESCRIPTIONS, GENERIC_DESCRIPTION

TINY_BACKBONES = ("tiny-gpt2", "tiny-llama", "tiny-bert")
UNK, PAD, EOS, BOS, CLS, SEP = "[UNK]", "[PAD]", "<|endoftext|>", "<s>", "[CLS]", "[SEP]"

# Words the Time-LLM prompt template itself uses, on top of the description texts.
_TEMPLATE = (
    "<|start_prompt|>Dataset description: Task description: forecast the next steps given the "
    "previous steps information; Input statistics: min value, max value, median value, "
    "the trend of input is upward, downward, top 5 lags are : <|<end_prompt>|> nan inf e"
)


def _corpus() -> str:
    bank = resources.files("timellm") / "datasets" / "prompt_bank"
    texts = [
        (bank / f).read_text(encoding="utf-8")
        for f in ("ECL.txt", "ETT.txt", "Traffic.txt", "Weather.txt", "m4.txt")
    ]
    return " ".join([_TEMPLATE, GENERIC_DESCRIPTION, *DESCRIPTIONS.values(), *texts])


def _vocab() -> dict[str, int]:
    """Words of the bundled prompt texts, every printable ASCII char and every 1-3 digit string
    (each also as a WordPiece continuation), so any ASCII text tokenizes without [UNK] and long
    numbers cost a token per 3 digits. Sorted: deterministic."""
    words = set(re.findall(r"[A-Za-z]+", _corpus().lower()))
    chars = {c for c in string.printable if not c.isspace()}
    digits = {"".join(p) for n in (1, 2, 3) for p in itertools.product(string.digits, repeat=n)}
    starts = words | chars | digits
    pieces = sorted(starts | {"##" + p for p in starts if p.isalnum() and len(p) <= 3})
    specials = [PAD, UNK, EOS, BOS, CLS, SEP]
    return {tok: i for i, tok in enumerate(specials + [p for p in pieces if p not in specials])}


def tiny_tokenizer(kind: str = "gpt2") -> PreTrainedTokenizerFast:
    """A small lowercase WordPiece tokenizer built from the bundled prompt text.

    Digit runs are cut into 3-digit pieces (like Llama-3's tokenizer). ``kind`` chooses the special-token convention: "gpt2" adds none,
    "llama" prepends ``<s>``, "bert" wraps in ``[CLS] ... [SEP]``; padding uses eos when the
    backbone has one, as upstream does.
    """
    vocab = _vocab()
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK, max_input_chars_per_word=100))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Whitespace(),
            pre_tokenizers.Digits(individual_digits=False),
            pre_tokenizers.Punctuation(),
        ]
    )
    tok.decoder = decoders.WordPiece()
    if kind == "llama":
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
        )
        extra = {"bos_token": BOS, "eos_token": EOS, "padding_side": "left"}
    elif kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single=f"{CLS} $A {SEP}",
            pair=f"{CLS} $A {SEP} $B {SEP}",
            special_tokens=[(CLS, vocab[CLS]), (SEP, vocab[SEP])],
        )
        extra = {"cls_token": CLS, "sep_token": SEP, "pad_token": PAD}
    elif kind == "gpt2":
        extra = {"eos_token": EOS, "bos_token": EOS}
    else:
        raise ValueError(f"unknown tiny tokenizer kind {kind!r}")
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, **extra)
    if wrapped.pad_token is None:  # upstream: pad with eos when there is one
        wrapped.pad_token = wrapped.eos_token
    return wrapped


def tiny_config(
    kind: str, tokenizer: PreTrainedTokenizerFast, hidden: int = 64, layers: int = 2
) -> PretrainedConfig:
    """Config of a tiny random backbone of the given family, sized to ``tokenizer``.

    Dropout is off: these are random stand-ins, and on CPU dropout masks over the attention
    matrix cost more than the rest of the tiny LLM (they also force SDPA's slow path).
    """
    heads, vocab_size = 4, len(tokenizer)
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if kind == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=1024,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
    if kind == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads // 2,
            max_position_embeddings=2048,
            **ids,
        )
    if kind == "bert":
        return BertConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=hidden * 2,
            max_position_embeddings=512,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            **ids,
        )
    raise ValueError(f"unknown tiny backbone kind {kind!r}")


_MODEL_CLASSES = {"gpt2": GPT2Model, "llama": LlamaModel, "bert": BertModel}


def tiny_backbone(
    kind: str, layers: int = 2, hidden: int = 64, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """``(model, tokenizer)`` for a tiny random ``kind`` ("gpt2", "llama", "bert") backbone."""
    tokenizer = tiny_tokenizer(kind)
    config = tiny_config(kind, tokenizer, hidden=hidden, layers=layers)
    # fork_rng: seeding must not perturb the caller's global RNG (the trainer's resume state).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _MODEL_CLASSES[kind](config)
    return model.eval(), tokenizer
