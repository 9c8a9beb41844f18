"""Prompt-as-prefix: Time-LLM's text prompt per series, and a fast exact way to tokenize it.

The prompt for one (normalized) input series is upstream's, character for character::

    <|start_prompt|>Dataset description: {description}Task description: forecast the next
    {pred_len} steps given the previous {seq_len} steps information; Input statistics: min value
    {min}, max value {max}, median value {median}, the trend of input is {upward|downward},
    top 5 lags are : {lags}<|<end_prompt>|>

(one line; numbers are ``str()`` of the float32 statistic, lags a Python list of 5 ints).

Upstream builds it per sample in a Python loop, calling ``.tolist()`` per statistic per sample
(a device sync each on GPU), and tokenizes every full prompt, description included, every step.
:class:`PromptEncoder` computes the statistics once per batch with tensor ops, moves them to the
host in five transfers, tokenizes the fixed pieces once, and tokenizes only the per-sample
pieces. The ids equal the reference path's exactly (checked at construction against the
tokenizer actually in use; see :meth:`PromptEncoder.segmented`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

TOP_K = 5  # upstream hard-codes 5 lags, and the prompt text says "top 5"
MAX_LENGTH = 2048  # upstream's tokenizer truncation length
START, END = "<|start_prompt|>", "<|<end_prompt>|>"  # sic: upstream's end marker


def prompt_head(description: str, seq_len: int, pred_len: int) -> str:
    """The part of every prompt that does not depend on the series."""
    return (
        f"{START}Dataset description: {description}"
        f"Task description: forecast the next {pred_len} steps given the previous "
        f"{seq_len} steps information; Input statistics: min value"
    )


def _tail(trend_up: bool, lags: list[int]) -> str:
    trend = "upward" if trend_up else "downward"
    return f" the trend of input is {trend}, top 5 lags are : {lags}{END}"


@dataclass(frozen=True)
class PromptStats:
    """Per-series statistics of a batch ``[BN, T, 1]``, on the input's device."""

    min: Tensor  # [BN, 1]
    max: Tensor  # [BN, 1]
    median: Tensor  # [BN, 1]
    trend: Tensor  # [BN, 1], sum of first differences
    lags: Tensor  # [BN, TOP_K], strongest autocorrelation lags


def calculate_lags(x: Tensor, top_k: int = TOP_K) -> Tensor:
    """Top-k lags of the FFT autocorrelation of ``x [BN, T, 1]`` (upstream ``calcute_lags``).

    Upstream transforms the same tensor twice (q and k); one FFT gives identical values.
    """
    spectrum = torch.fft.rfft(x.permute(0, 2, 1).contiguous(), dim=-1)
    corr = torch.fft.irfft(spectrum * torch.conj(spectrum), dim=-1)
    return torch.topk(torch.mean(corr, dim=1), top_k, dim=-1).indices


def prompt_statistics(x: Tensor) -> PromptStats:
    """Statistics of ``x [BN, T, 1]`` with the same tensor ops as upstream (same values,
    same tie-breaking), for the whole batch at once."""
    # torch.min/max rather than aminmax: the same kernels as upstream, so even the sign of a
    # zero (str(-0.0) == "-0.0") matches.
    return PromptStats(
        min=torch.min(x, dim=1).values,
        max=torch.max(x, dim=1).values,
        median=torch.median(x, dim=1).values,
        trend=x.diff(dim=1).sum(dim=1),
        lags=calculate_lags(x),
    )


@dataclass(frozen=True)
class _HostStats:
    """Statistics as Python values: one host transfer per field for the whole batch."""

    min: list[float]
    max: list[float]
    median: list[float]
    up: list[bool]
    lags: list[list[int]]

    @classmethod
    def of(cls, s: PromptStats) -> _HostStats:
        return cls(
            min=s.min[:, 0].tolist(),
            max=s.max[:, 0].tolist(),
            median=s.median[:, 0].tolist(),
            up=(s.trend[:, 0] > 0).tolist(),
            lags=s.lags.tolist(),
        )


def _render(head: str, h: _HostStats) -> list[str]:
    return [
        f"{head} {lo}, max value {hi}, median value {med},{_tail(up, lags)}"
        for lo, hi, med, up, lags in zip(h.min, h.max, h.median, h.up, h.lags, strict=True)
    ]


def format_prompts(stats: PromptStats, description: str, seq_len: int, pred_len: int) -> list[str]:
    """Prompt texts for a batch (vectorized statistics, per-sample string formatting)."""
    return _render(prompt_head(description, seq_len, pred_len), _HostStats.of(stats))


def build_prompts_reference(x: Tensor, description: str, seq_len: int, pred_len: int) -> list[str]:
    """Straightforward per-sample prompt loop, as upstream ``Model.forecast`` writes it.

    Kept as the oracle for :func:`format_prompts` / :class:`PromptEncoder` and as the "upstream"
    side of the benchmark. ``x`` is the normalized batch ``[BN, T, 1]``.
    """
    min_values = torch.min(x, dim=1)[0]
    max_values = torch.max(x, dim=1)[0]
    medians = torch.median(x, dim=1).values
    lags = calculate_lags(x)
    trends = x.diff(dim=1).sum(dim=1)
    prompts = []
    for b in range(x.shape[0]):
        min_str = str(min_values[b].tolist()[0])
        max_str = str(max_values[b].tolist()[0])
        median_str = str(medians[b].tolist()[0])
        lags_str = str(lags[b].tolist())
        prompts.append(
            f"{START}Dataset description: {description}"
            f"Task description: forecast the next {pred_len} steps given the previous "
            f"{seq_len} steps information; "
            "Input statistics: "
            f"min value {min_str}, "
            f"max value {max_str}, "
            f"median value {median_str}, "
            f"the trend of input is {'upward' if trends[b] > 0 else 'downward'}, "
            f"top 5 lags are : {lags_str}{END}"
        )
    return prompts


def tokenize_reference(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> Tensor:
    """Upstream's tokenizer call: pad to the longest prompt, truncate at 2048 tokens."""
    return tokenizer(
        prompts, return_tensors="pt", padding=True, truncation=True, max_length=MAX_LENGTH
    ).input_ids


# Values that stress segment boundaries: signs, exponents, nan/inf, long digit runs.
_PROBE_VALUES = [
    -0.0, 0.0, 1.0, -1.5, 1e-05, -2.5e-07, 123456.789, 0.30000001192092896,
    -3.4028234663852886e38, float("nan"), float("inf"), float("-inf"),
]  # fmt: skip
_PROBE_LAGS = [[0, 1, 2, 3, 4], [511, 96, 24, 7, 1000], [10, 9, 8, 7, 6]]


class PromptEncoder:
    """Turns a normalized batch into prompt token ids, exactly as upstream but faster.

    The prompt is cut at places where common tokenizers (byte-level BPE as in GPT-2/Llama-3,
    WordPiece as in BERT) cannot merge across: before a space. The fixed head is tokenized once,
    number pieces per batch in one call, and the trend+lags tail is memoized (few distinct
    values). At construction the segmented ids are compared with whole-prompt tokenization on
    probe prompts; if the tokenizer disagrees anywhere (e.g. SentencePiece adding a prefix space
    to every piece), :attr:`segmented` is False and :meth:`encode` tokenizes whole prompts.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        description: str,
        seq_len: int,
        pred_len: int,
        tail_cache_size: int = 100_000,
    ):
        self.tokenizer = tokenizer
        self.description, self.seq_len, self.pred_len = description, seq_len, pred_len
        self._tail_cache: dict[tuple[bool, tuple[int, ...]], list[int]] = {}
        self._tail_cache_size = tail_cache_size
        self._prefix, self._suffix = _special_tokens(tokenizer)
        self._head_text = prompt_head(description, seq_len, pred_len)
        pieces = [self._head_text, " max value", " median value"]
        self._head, self._max, self._med = self._tokenize(pieces)
        self._pad_id = tokenizer.pad_token_id
        self._pad_left = tokenizer.padding_side == "left"
        self.segmented = self._segments_match_whole()

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def texts(self, x: Tensor) -> list[str]:
        """Prompt texts for the normalized batch ``x [BN, T, 1]``."""
        return format_prompts(prompt_statistics(x), self.description, self.seq_len, self.pred_len)

    def encode(self, x: Tensor) -> Tensor:
        """Padded prompt ids ``[BN, L]`` (int64, on CPU), equal to the reference path's."""
        stats = _HostStats.of(prompt_statistics(x))
        if not self.segmented:
            return tokenize_reference(self.tokenizer, self._texts_from(stats))
        rows = self._segmented_rows(stats)
        if max(map(len, rows)) > MAX_LENGTH:  # truncation: leave it to the tokenizer
            return tokenize_reference(self.tokenizer, self._texts_from(stats))
        return self._pad(rows)

    def _texts_from(self, h: _HostStats) -> list[str]:
        return _render(self._head_text, h)

    def _segmented_rows(self, h: _HostStats) -> list[list[int]]:
        n = len(h.min)
        nums = self._tokenize([f" {v}," for v in (*h.min, *h.max, *h.median)])
        tails = [self._tail_ids(up, lags) for up, lags in zip(h.up, h.lags, strict=True)]
        return [
            self._prefix
            + self._head
            + nums[i]
            + self._max
            + nums[n + i]
            + self._med
            + nums[2 * n + i]
            + tails[i]
            + self._suffix
            for i in range(n)
        ]

    def _tail_ids(self, up: bool, lags: list[int]) -> list[int]:
        key = (up, tuple(lags))
        ids = self._tail_cache.get(key)
        if ids is None:
            if len(self._tail_cache) >= self._tail_cache_size:
                self._tail_cache.clear()
            ids = self._tail_cache[key] = self._tokenize([_tail(up, lags)])[0]
        return ids

    def _pad(self, rows: list[list[int]]) -> Tensor:
        width = max(map(len, rows))
        pad = self._pad_id
        if self._pad_left:
            rows = [[pad] * (width - len(r)) + r for r in rows]
        else:
            rows = [r + [pad] * (width - len(r)) for r in rows]
        return torch.tensor(rows, dtype=torch.long)

    def _segments_match_whole(self) -> bool:
        vals = _PROBE_VALUES
        n = len(vals)
        probe = _HostStats(
            min=vals,
            max=vals[::-1],
            median=vals[n // 2 :] + vals[: n // 2],
            up=[i % 2 == 0 for i in range(n)],
            lags=[_PROBE_LAGS[i % len(_PROBE_LAGS)] for i in range(n)],
        )
        whole = self.tokenizer(self._texts_from(probe))["input_ids"]
        return whole == self._segmented_rows(probe)


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Ids the tokenizer adds before/after a single sequence (BOS, [CLS] ... [SEP], none)."""
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []  # unusual template: the probe check will fail and disable segmentation
