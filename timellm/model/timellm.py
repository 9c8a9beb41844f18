"""The Time-LLM model (Jin et al., ICLR 2024), faithful to upstream ``models/TimeLLM.py``.

Forward, for a batch ``x_enc [B, T, N]``:

1. RevIN-normalize each series over time.
2. Build a text prompt per series (dataset description, task, min/max/median/trend/top-5
   lags of the normalized series) and embed it with the LLM's own word embeddings.
3. Text prototypes: ``mapping_layer`` (Linear vocab -> num_tokens) over the transposed word
   embedding matrix gives ``num_tokens`` vectors in the LLM's space.
4. Patch each series (length 16, stride 8, end padded by repetition), embed patches with a
   circular conv, and reprogram them by cross-attention onto the text prototypes.
5. Run ``[prompt ; reprogrammed patches]`` through the frozen, truncated LLM; keep the first
   ``d_ff`` channels of the patch positions; ``FlattenHead`` projects to ``pred_len``.
6. De-normalize. Output ``[B, pred_len, N]``.

Differences from upstream that do not change the math: statistics are returned from the
normalizer instead of stored on it; the prompt is tokenized by :class:`PromptEncoder` (same
ids, fewer tokenizer calls); the LLM does not materialize attention maps or hidden states
(upstream asks for them and discards them); the compute dtype is a parameter (upstream
hard-codes a bf16 cast under accelerate's autocast); in eval mode without grad, the text
prototypes are computed once and reused until the mapping layer's weights change.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from ckptkit import TrainableOnly
from ckptkit.errors import ConfigError, IncompatibleCheckpointError
from timellm.data.descriptions import dataset_description, upstream_domain_text
from timellm.model.backbone import DTYPES, Backbone, load_backbone
from timellm.model.layers import FlattenHead, Normalize, PatchEmbedding, ReprogrammingLayer
from timellm.model.presets import TimeLLMConfig
from timellm.model.prompt import PromptEncoder

# What upstream says when --prompt_domain is 0 (its default).
UPSTREAM_DEFAULT_DESCRIPTION = (
    "The Electricity Transformer Temperature (ETT) is a crucial indicator in the electric power "
    "long-term deployment."
)
_LLM = "llm_model"  # attribute (and state-dict prefix) of the frozen backbone, as upstream


class TimeLLM(nn.Module):
    """Time-LLM for long/short-term forecasting. Only non-LLM modules are trainable."""

    def __init__(self, cfg: TimeLLMConfig, backbone: Backbone, description: str):
        super().__init__()
        if cfg.d_ff > backbone.d_llm:
            raise ConfigError(
                f"TimeLLMConfig.d_ff: must be <= the LLM hidden size ({backbone.d_llm}), "
                f"got {cfg.d_ff}"
            )
        if cfg.llm_dim is not None and cfg.llm_dim != backbone.d_llm:
            raise ConfigError(
                f"TimeLLMConfig.llm_dim: {cfg.llm_dim} but {backbone.name} has hidden size "
                f"{backbone.d_llm}; pass llm_dim={backbone.d_llm} or leave it unset"
            )
        if DTYPES[cfg.dtype] != backbone.dtype:
            raise ConfigError(
                f"TimeLLMConfig.dtype: {cfg.dtype!r} but the backbone was loaded as "
                f"{backbone.dtype}; load it with the config's dtype"
            )
        self.cfg, self.backbone_name, self.backbone_quantize = cfg, backbone.name, backbone.quantize
        self.pred_len, self.seq_len, self.d_ff = cfg.pred_len, cfg.seq_len, cfg.d_ff
        self.compute_dtype = DTYPES[cfg.dtype]
        self.description = description
        self.llm_model = backbone.model
        self.tokenizer = backbone.tokenizer
        self.prompt = PromptEncoder(backbone.tokenizer, description, cfg.seq_len, cfg.pred_len)

        self.patch_embedding = PatchEmbedding(cfg.d_model, cfg.patch_len, cfg.stride, cfg.dropout)
        vocab_size = self.word_embeddings.shape[0]
        self.mapping_layer = nn.Linear(vocab_size, cfg.num_tokens)
        self.reprogramming_layer = ReprogrammingLayer(
            cfg.d_model, cfg.n_heads, cfg.d_ff, backbone.d_llm
        )
        self.patch_nums = cfg.patch_nums
        self.head_nf = cfg.d_ff * self.patch_nums
        # Channel independence: every sample is one variable, so n_vars is 1 here (upstream
        # passes enc_in; neither module uses it without affine parameters).
        self.output_projection = FlattenHead(1, self.head_nf, cfg.pred_len, cfg.dropout)
        self.normalize_layers = Normalize(1, affine=False)
        self._prototype_cache: tuple[Any, Tensor] | None = None
        self._core = torch.compile(self._forward_core, dynamic=True) if cfg.compile else None
        self.train()  # one mode for all parts (from_pretrained leaves the LLM in eval mode)

    @property
    def word_embeddings(self) -> Tensor:
        """The frozen LLM's input embedding matrix ``[vocab, d_llm]`` (not a parameter of ours,
        so it never appears twice in a state dict)."""
        return self.llm_model.get_input_embeddings().weight

    # --- forward ---------------------------------------------------------------------------

    def forward(
        self,
        x_enc: Tensor,
        x_mark_enc: Tensor | None = None,
        x_dec: Tensor | None = None,
        x_mark_dec: Tensor | None = None,
    ) -> Tensor:
        """``x_enc [B, seq_len, N]`` -> forecast ``[B, pred_len, N]`` (float32).

        The time marks and decoder input are accepted for upstream call compatibility and
        ignored, as upstream ignores them.
        """
        return self.forecast(x_enc)[:, -self.pred_len :, :]

    def forecast(self, x_enc: Tensor) -> Tensor:
        x_norm, stats = self.normalize_layers.norm(x_enc.float())
        prompt_ids = self.prompt_ids(x_norm)
        with self._autocast(x_norm.device):
            dec_out = (self._core or self._forward_core)(x_norm, prompt_ids)
        return self.normalize_layers.denorm(dec_out.float(), stats)

    # The stages below are public so a benchmark can time them one by one; forward() is
    # exactly _forward_core() between normalization and de-normalization.

    def prompt_ids(self, x_norm: Tensor) -> Tensor:
        """Prompt token ids ``[B*N, L]`` for the normalized batch ``[B, T, N]``, on its device."""
        B, T, N = x_norm.shape
        series = x_norm.permute(0, 2, 1).reshape(B * N, T, 1)
        return self.prompt.encode(series).to(x_norm.device, non_blocking=True)

    def _forward_core(self, x_norm: Tensor, prompt_ids: Tensor) -> Tensor:
        prompt_embeddings = self.llm_model.get_input_embeddings()(prompt_ids)
        patches = self.reprogram(x_norm, self.text_prototypes())
        return self.decode(prompt_embeddings, patches, n_vars=x_norm.shape[-1])

    def reprogram(self, x_norm: Tensor, prototypes: Tensor) -> Tensor:
        """Patch ``x_norm [B, T, N]`` and cross-attend onto the text prototypes:
        ``[B*N, patch_nums, d_llm]``."""
        enc_out, _ = self.patch_embedding(x_norm.permute(0, 2, 1))
        return self.reprogramming_layer(enc_out, prototypes, prototypes)

    def decode(self, prompt_embeddings: Tensor, patches: Tensor, n_vars: int) -> Tensor:
        """LLM over ``[prompt ; patches]``, then the output head: ``[B, pred_len, N]``."""
        llm_in = torch.cat([prompt_embeddings, patches.to(prompt_embeddings.dtype)], dim=1)
        dec_out = self.llm_model(inputs_embeds=llm_in).last_hidden_state[:, :, : self.d_ff]
        dec_out = dec_out.reshape(-1, n_vars, dec_out.shape[-2], dec_out.shape[-1])
        dec_out = self.output_projection(dec_out.permute(0, 1, 3, 2)[:, :, :, -self.patch_nums :])
        return dec_out.permute(0, 2, 1)

    def text_prototypes(self) -> Tensor:
        """``[num_tokens, d_llm]``: ``mapping_layer`` applied across the vocabulary."""
        if torch.is_grad_enabled() or self.training:
            self._prototype_cache = None
            return self._map_vocabulary()
        # Eval without grad: the result only changes when the mapping layer does.
        w, b = self.mapping_layer.weight, self.mapping_layer.bias
        key = (w._version, b._version, w.data_ptr(), b.data_ptr(), _autocast_state(w.device))
        if self._prototype_cache is None or self._prototype_cache[0] != key:
            self._prototype_cache = (key, self._map_vocabulary())
        return self._prototype_cache[1]

    def _map_vocabulary(self) -> Tensor:
        # A transposed view, not a copy: the matmul reads it in place.
        return self.mapping_layer(self.word_embeddings.permute(1, 0)).permute(1, 0)

    def _autocast(self, device: torch.device):
        if self.compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.compute_dtype)

    # --- checkpoint helpers ----------------------------------------------------------------

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """State of every module except the frozen LLM (upstream key names)."""
        out: dict[str, Tensor] = {}
        for name, child in self.named_children():
            if name != _LLM:
                out.update(child.state_dict(prefix=f"{name}."))
        return out

    def load_trainable_state_dict(self, state: dict[str, Tensor], strict: bool = True) -> None:
        """Load what :meth:`trainable_state_dict` returned. ``strict``: the key sets and shapes
        must match exactly, else :class:`IncompatibleCheckpointError` lists the differences."""
        own = self.check_trainable_state_dict(state, strict=strict)
        with torch.no_grad():
            for key, value in state.items():
                if key in own:
                    own[key].copy_(value)
        self._prototype_cache = None

    def check_trainable_state_dict(
        self, state: dict[str, Tensor], strict: bool = True
    ) -> dict[str, Tensor]:
        """Raise :class:`IncompatibleCheckpointError` unless :meth:`load_trainable_state_dict`
        would take ``state``; changes nothing. Returns the model's own trainable state."""
        own = self.trainable_state_dict()
        if strict:
            _check_same_keys(own, state)
        bad = [
            f"{k}: {_shape(v)} vs {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and not (isinstance(v, Tensor) and v.shape == own[k].shape)
        ]
        if bad:
            raise IncompatibleCheckpointError(
                f"trainable state shape mismatch: {'; '.join(bad[:4])}"
            )
        return own

    def trainable_state(self) -> TrainableState:
        """An object with ``state_dict()``/``load_state_dict()`` over the trainable state only,
        to put in a ckptkit ``state`` dict instead of the whole model."""
        return TrainableState(self)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def backbone_fingerprint(self) -> dict[str, Any]:
        """See :func:`timellm.model.backbone.backbone_fingerprint`; compare ``["digest"]``."""
        return Backbone(
            self.llm_model,
            self.tokenizer,
            self.backbone_name,
            self.compute_dtype,
            self.backbone_quantize,
        ).fingerprint()

    def train(self, mode: bool = True) -> TimeLLM:
        # The frozen LLM follows train/eval like upstream (its dropout is active in training).
        self._prototype_cache = None
        return super().train(mode)


class TrainableState(TrainableOnly):
    """Kept for imports: the same as ``ckptkit.TrainableOnly(model)``, which also reads the
    flat state this class wrote before (runs saved then still resume)."""


def _shape(value: Any) -> Any:
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__


def _check_same_keys(own: dict[str, Tensor], state: dict[str, Tensor]) -> None:
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise IncompatibleCheckpointError(
            f"trainable state does not match the model: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]} (different preset or d_model/d_ff/num_tokens?)"
        )


def _autocast_state(device: torch.device) -> Any:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def resolve_description(cfg: TimeLLMConfig) -> str:
    """The dataset-description text a config's prompts use."""
    if cfg.description is not None:
        return cfg.description
    if not cfg.domain_prompt:
        return UPSTREAM_DEFAULT_DESCRIPTION
    if cfg.compat == "upstream":
        return upstream_domain_text(cfg.data)
    return dataset_description(cfg.data)


def build_model(cfg: TimeLLMConfig, backbone: Backbone | None = None) -> TimeLLM:
    """Load the backbone (unless given) and build a :class:`TimeLLM` whose trainable weights
    are initialized from ``cfg.seed`` (same config -> same initial model, in any process)."""
    if backbone is None:
        backbone = load_backbone(
            cfg.llm, cfg.llm_layers, cfg.dtype, cfg.quantize, allow_download=cfg.allow_download
        )
    if cfg.gradient_checkpointing:
        backbone.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return TimeLLM(cfg, backbone, resolve_description(cfg))
