"""The fast prompt path must produce exactly the per-sample reference's text and token ids."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from timellm.data import DESCRIPTIONS, GENERIC_DESCRIPTION
from timellm.model.prompt import (
    PromptEncoder,
    build_prompts_reference,
    format_prompts,
    prompt_statistics,
    tokenize_reference,
)
from timellm.model.tiny import _corpus, tiny_tokenizer

EOS = "<|endoftext|>"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _bpe(pre_tokenizer, vocab_size: int = 800) -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained on the bundled prompt text (GPT-2 / Llama-3 style)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOS],
        show_progress=False,
    )
    corpus = _corpus() + " 0.123456789 -1.5e-05 [0, 1, 2, 3, 4] upward downward"
    tok.train_from_iterator([corpus] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def _fixed_chunks() -> PreTrainedTokenizerFast:
    """Splits text into 4-character chunks regardless of spaces: segmenting cannot be exact."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(".{1,4}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([_corpus()], trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok)
    wrapped.add_special_tokens({"pad_token": "[PAD]"})
    return wrapped


TOKENIZERS = {
    "tiny-wordpiece": lambda: tiny_tokenizer("gpt2"),
    "tiny-llama-bos-leftpad": lambda: tiny_tokenizer("llama"),
    "tiny-bert-cls-sep": lambda: tiny_tokenizer("bert"),
    "bytelevel-gpt2": lambda: _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False)),
    "bytelevel-llama3": lambda: _bpe(
        pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    ),
    "metaspace": lambda: _bpe(pre_tokenizers.Metaspace(prepend_scheme="first")),
    "fixed-chunks": _fixed_chunks,
}


def _batches() -> dict[str, torch.Tensor]:
    """Random and adversarial ``[BN, T, 1]`` batches (ties, constants, signed zeros, ...)."""
    g = torch.Generator().manual_seed(0)
    t = 96
    ramp = torch.arange(t, dtype=torch.float32)
    periodic = torch.sin(2 * torch.pi * ramp / 24)
    rows = {
        "random": torch.randn(32, t, 1, generator=g),
        "scaled": torch.randn(8, t, 1, generator=g)
        * torch.tensor([1e-30, 1e-6, 1, 1e6, 1e30, 3, 7, 1e-3]).view(8, 1, 1),
        "integers_with_ties": torch.randint(-3, 4, (16, t, 1), generator=g).float(),
        "constant": torch.full((4, t, 1), 2.5),
        "zeros_signed": torch.stack(
            [
                torch.zeros(t),
                -torch.zeros(t),
                torch.zeros(t).index_fill(0, torch.tensor([5]), -0.0),
                ramp * 0,
            ]
        ).unsqueeze(-1),
        "ramp_up_down": torch.stack([ramp, -ramp, periodic, periodic.flip(0)]).unsqueeze(-1),
        "odd_length": torch.randn(6, 97, 1, generator=g),
        "short": torch.randn(5, 16, 1, generator=g),
        "nonfinite": torch.stack(
            [
                ramp.index_fill(0, torch.tensor([3]), float("nan")),
                ramp.index_fill(0, torch.tensor([7]), float("inf")),
                ramp.index_fill(0, torch.tensor([1]), float("-inf")),
            ]
        ).unsqueeze(-1),
    }
    return rows


BATCHES = _batches()


@pytest.mark.parametrize("description", [DESCRIPTIONS["ETTh1"], GENERIC_DESCRIPTION])
def test_vectorized_text_equals_reference(description):
    for name, x in BATCHES.items():
        fast = format_prompts(prompt_statistics(x), description, x.shape[1], 24)
        assert fast == build_prompts_reference(x, description, x.shape[1], 24), name


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_encoder_ids_equal_reference(name):
    tokenizer = TOKENIZERS[name]()
    for batch, x in BATCHES.items():
        enc = PromptEncoder(tokenizer, DESCRIPTIONS["ETTh2"], x.shape[1], 96)
        texts = build_prompts_reference(x, DESCRIPTIONS["ETTh2"], x.shape[1], 96)
        expected = tokenize_reference(tokenizer, texts)
        assert torch.equal(enc.encode(x), expected), batch
        assert torch.equal(enc.encode(x), expected), batch  # second call: memoized tails
        assert enc.texts(x) == texts, batch


def test_segmentation_used_where_exact_and_refused_where_not():
    for name in (
        "tiny-wordpiece",
        "tiny-llama-bos-leftpad",
        "tiny-bert-cls-sep",
        "bytelevel-gpt2",
        "bytelevel-llama3",
    ):
        assert PromptEncoder(TOKENIZERS[name](), GENERIC_DESCRIPTION, 96, 24).segmented, name
    assert not PromptEncoder(_fixed_chunks(), GENERIC_DESCRIPTION, 96, 24).segmented


def test_truncation_falls_back_to_tokenizer():
    tok = tiny_tokenizer("gpt2")
    long_description = "the transformer oil temperature " * 700  # > 2048 tokens
    x = BATCHES["random"][:4]
    enc = PromptEncoder(tok, long_description, 96, 24)
    ids = enc.encode(x)
    assert ids.shape[1] == 2048
    assert torch.equal(
        ids, tokenize_reference(tok, build_prompts_reference(x, long_description, 96, 24))
    )


def test_prompt_text_format_is_upstreams():
    x = torch.arange(16, dtype=torch.float32).view(1, 16, 1)
    (text,) = build_prompts_reference(x, "D.", 16, 4)
    assert text.startswith(
        "<|start_prompt|>Dataset description: D.Task description: forecast the next 4 steps "
        "given the previous 16 steps information; Input statistics: min value 0.0, max value "
        "15.0, median value 7.0, the trend of input is upward, top 5 lags are : ["
    )
    assert text.endswith("]<|<end_prompt>|>")
    assert format_prompts(prompt_statistics(x), "D.", 16, 4) == [text]
