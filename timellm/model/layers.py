"""Time-LLM's trainable building blocks, numerically identical to upstream's.

Module and parameter names follow upstream (``patch_embedding.value_embedding.tokenConv``,
``reprogramming_layer.query_projection``, ``output_projection.linear``, ...) so the trainable
state dict keys match an upstream checkpoint's.
"""

from __future__ import annotations

from math import sqrt

import torch
from torch import Tensor, nn


class Normalize(nn.Module):
    """RevIN-style instance normalization (upstream ``layers/StandardNorm.Normalize``).

    Upstream stores the statistics on the module between ``'norm'`` and ``'denorm'`` calls; we
    return them instead (:meth:`norm` / :meth:`denorm`), which is the same math without hidden
    state, so one module can serve interleaved batches and ``torch.compile``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = False,
        subtract_last: bool = False,
        non_norm: bool = False,
    ):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.affine, self.subtract_last, self.non_norm = affine, subtract_last, non_norm
        if affine:
            self.affine_weight = nn.Parameter(torch.ones(num_features))
            self.affine_bias = nn.Parameter(torch.zeros(num_features))

    def norm(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Normalize ``x [B, T, N]`` over time; returns ``(x_norm, (center, stdev))``."""
        dims = tuple(range(1, x.ndim - 1))
        if self.subtract_last:
            center = x[:, -1, :].unsqueeze(1)
        else:
            center = torch.mean(x, dim=dims, keepdim=True).detach()
        stdev = torch.sqrt(torch.var(x, dim=dims, keepdim=True, unbiased=False) + self.eps).detach()
        if self.non_norm:
            return x, (center, stdev)
        x = (x - center) / stdev
        if self.affine:
            x = x * self.affine_weight + self.affine_bias
        return x, (center, stdev)

    def denorm(self, x: Tensor, stats: tuple[Tensor, Tensor]) -> Tensor:
        if self.non_norm:
            return x
        center, stdev = stats
        if self.affine:
            x = (x - self.affine_bias) / (self.affine_weight + self.eps * self.eps)
        return x * stdev + center


class TokenEmbedding(nn.Module):
    """Circular 1-D conv (kernel 3, no bias) embedding each patch; Kaiming-normal init."""

    def __init__(self, c_in: int, d_model: int):
        super().__init__()
        self.tokenConv = nn.Conv1d(
            c_in, d_model, kernel_size=3, padding=1, padding_mode="circular", bias=False
        )
        nn.init.kaiming_normal_(self.tokenConv.weight, mode="fan_in", nonlinearity="leaky_relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.tokenConv(x.permute(0, 2, 1)).transpose(1, 2)


class PatchEmbedding(nn.Module):
    """Pad the end by repeating the last value ``stride`` times, cut overlapping patches,
    embed each. ``[B, N, T] -> [B*N, patch_nums, d_model]``."""

    def __init__(self, d_model: int, patch_len: int, stride: int, dropout: float):
        super().__init__()
        self.patch_len, self.stride = patch_len, stride
        self.value_embedding = TokenEmbedding(patch_len, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, int]:
        n_vars = x.shape[1]
        x = torch.cat([x, x[:, :, -1:].expand(-1, -1, self.stride)], dim=-1)
        x = x.unfold(dimension=-1, size=self.patch_len, step=self.stride)
        x = x.reshape(x.shape[0] * x.shape[1], x.shape[2], x.shape[3])
        return self.dropout(self.value_embedding(x)), n_vars


class ReprogrammingLayer(nn.Module):
    """Cross-attention from patch embeddings (queries) to text prototypes (keys/values)."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_keys: int | None = None,
        d_llm: int | None = None,
        attention_dropout: float = 0.1,
    ):
        super().__init__()
        d_keys = d_keys or (d_model // n_heads)
        d_llm = d_llm or d_model
        self.query_projection = nn.Linear(d_model, d_keys * n_heads)
        self.key_projection = nn.Linear(d_llm, d_keys * n_heads)
        self.value_projection = nn.Linear(d_llm, d_keys * n_heads)
        self.out_projection = nn.Linear(d_keys * n_heads, d_llm)
        self.n_heads = n_heads
        self.dropout = nn.Dropout(attention_dropout)

    def forward(self, target: Tensor, source: Tensor, value: Tensor) -> Tensor:
        B, L, _ = target.shape
        S, _ = source.shape
        H = self.n_heads
        q = self.query_projection(target).view(B, L, H, -1)
        k = self.key_projection(source).view(S, H, -1)
        v = self.value_projection(value).view(S, H, -1)
        scale = 1.0 / sqrt(q.shape[-1])
        scores = torch.einsum("blhe,she->bhls", q, k)
        attn = self.dropout(torch.softmax(scale * scores, dim=-1))
        out = torch.einsum("bhls,she->blhe", attn, v)
        return self.out_projection(out.reshape(B, L, -1))


class FlattenHead(nn.Module):
    """``[B, N, d_ff, patch_nums] -> [B, N, pred_len]``."""

    def __init__(self, n_vars: int, nf: int, target_window: int, head_dropout: float = 0.0):
        super().__init__()
        self.n_vars = n_vars
        self.flatten = nn.Flatten(start_dim=-2)
        self.linear = nn.Linear(nf, target_window)
        self.dropout = nn.Dropout(head_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.linear(self.flatten(x)))
