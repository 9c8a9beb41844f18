"""A GPT-2-shaped training state of a chosen size: the model + AdamW after one step.

Shaped like Hugging Face's ``GPT2LMHeadModel`` (``transformer.wte``/``wpe`` embeddings,
12 blocks of ``ln_1``, ``attn.c_attn``, ``attn.c_proj``, ``ln_2``, ``mlp.c_fc``,
``mlp.c_proj`` weights and biases, ``ln_f``, and ``lm_head`` tied to ``wte``), so a
checkpoint holds hundreds of tensors of mixed sizes, as real ones do, not a few big
blocks that flatter a writer. Two of its quirks are kept on purpose, because writers
trip on them: ``lm_head.weight`` shares its storage with ``wte.weight`` (a tied weight
appears twice in the state dict), and every ``attn.c_proj.weight`` is a transposed view
(non-contiguous, and so are its AdamW moments).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LAYERS = 12
POSITIONS = 1024
VOCAB = 50257
HEAD_DIM = 64
BYTES_PER_PARAM = 12  # float32 weight + AdamW's exp_avg and exp_avg_sq


@dataclass(frozen=True)
class Shape:
    width: int
    vocab: int
    layers: int = LAYERS
    positions: int = POSITIONS

    @property
    def params(self) -> int:
        d = self.width
        per_layer = 12 * d * d + 13 * d  # qkv, proj, fc, fc-proj weights; biases; 2 norms
        return (self.vocab + self.positions) * d + self.layers * per_layer + 2 * d

    @classmethod
    def for_megabytes(cls, megabytes: float) -> Shape:
        """The shape whose weights + AdamW moments come closest to ``megabytes``: GPT-2's
        vocabulary (fewer words for tiny states), its 12 layers, the width chosen."""
        params = megabytes * 1e6 / BYTES_PER_PARAM
        best: Shape | None = None
        for width in range(32, 4097, 32):
            # Embeddings take about a third of GPT-2 small; keep that share when small.
            vocab = max(256, min(VOCAB, int(params * 0.3 / width)))
            positions = min(POSITIONS, max(64, vocab // 8))
            shape = cls(width, vocab, positions=positions)
            if best is None or abs(shape.params - params) < abs(best.params - params):
                best = shape
        assert best is not None
        return best


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.heads = max(1, d // HEAD_DIM)
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(d, 3 * d)
        self.attn.c_proj = nn.Linear(d, d)
        # A transposed view, as a Conv1D-to-Linear conversion leaves it: non-contiguous.
        self.attn.c_proj.weight = nn.Parameter(torch.empty(d, d).t())
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(d, 4 * d)
        self.mlp.c_proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn.c_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x))))


class GPT2Shaped(nn.Module):
    def __init__(self, shape: Shape) -> None:
        super().__init__()
        self.shape = shape
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(shape.vocab, shape.width)
        self.transformer.wpe = nn.Embedding(shape.positions, shape.width)
        self.transformer.h = nn.ModuleList(Block(shape.width) for _ in range(shape.layers))
        self.transformer.ln_f = nn.LayerNorm(shape.width)
        self.lm_head = nn.Linear(shape.width, shape.vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        std = 0.02 / math.sqrt(2 * shape.layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.01)  # not zero: a byte check must see them
                elif "ln" in name:
                    p.normal_(1, 0.01)
                else:
                    p.normal_(0, std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1])
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def train_step(
    model: GPT2Shaped, opt: torch.optim.Optimizer, batch: int = 2, seq: int = 16
) -> None:
    """One forward, backward and AdamW step on random tokens."""
    idx = torch.randint(0, model.shape.vocab, (batch, seq + 1))
    logits = model(idx[:, :-1])
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def build(megabytes: float, seed: int = 0) -> tuple[GPT2Shaped, torch.optim.AdamW]:
    """The model and its AdamW after one step (so exp_avg/exp_avg_sq exist). The step's
    gradients are random rather than backpropagated: the state is the same kind, and a
    1 GB state is built in seconds (the memory probes build one per process)."""
    torch.manual_seed(seed)
    model = GPT2Shaped(Shape.for_megabytes(megabytes))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.empty_like(p).normal_(0, 1e-3)  # empty_like keeps p's strides
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def tensors(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor of the training state, in a fixed order (tied ones once)."""
    out: list[torch.Tensor] = []
    for p in model.parameters():  # parameters() yields a tied weight once
        out.append(p.detach())
    for p in model.parameters():
        # By name: a loader may rebuild each parameter's state in another key order.
        for _, value in sorted(opt.state.get(p, {}).items()):
            if isinstance(value, torch.Tensor):
                out.append(value)
    return out


def nbytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for t in tensors(model, opt))


def digest(model: nn.Module, opt: torch.optim.Optimizer) -> str:
    """A hash of every byte of the state: equal digests, equal states."""
    import xxhash

    h = xxhash.xxh3_128()
    for t in tensors(model, opt):
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def scramble(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Overwrite every tensor, so that a restore that loads nothing is caught."""
    with torch.no_grad():
        for t in tensors(model, opt):
            t.fill_(-7.0)


def touch(model: nn.Module, opt: torch.optim.Optimizer) -> float:
    """Read every restored byte (a sum per tensor): lazily mapped data must be loaded
    inside the timed restore, not later in the first training step."""
    total = 0.0
    for t in tensors(model, opt):
        total += float(t.sum())
    return total
