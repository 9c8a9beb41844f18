"""Time-LLM model: shapes, frozen backbone, upstream-equivalent math, checkpoint helpers."""

from __future__ import annotations

import pytest
import torch

from ckptkit.errors import ConfigError, IncompatibleCheckpointError, MissingDependencyError
from timellm import TimeLLMConfig, build_model, get_preset, load_backbone
from timellm.model.prompt import build_prompts_reference, tokenize_reference

SMALL = dict(seq_len=32, label_len=16, pred_len=8, d_model=8, d_ff=16, n_heads=2, num_tokens=20)


def _cfg(llm: str = "tiny-gpt2", **kw) -> TimeLLMConfig:
    return get_preset("tiny-cpu", llm=llm, **{**SMALL, **kw})


@pytest.fixture(scope="module")
def gpt2_model():
    return build_model(_cfg())


@pytest.mark.parametrize("llm", ["tiny-gpt2", "tiny-llama", "tiny-bert"])
@pytest.mark.parametrize("n_vars", [1, 3])
def test_forward_backward_shapes_and_frozen_llm(llm, n_vars):
    model = build_model(_cfg(llm))
    x = torch.randn(4, 32, n_vars)
    out = model(x, None, None, None)
    assert out.shape == (4, 8, n_vars) and out.dtype == torch.float32
    out.pow(2).mean().backward()
    for name, p in model.named_parameters():
        if name.startswith("llm_model."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None, name
    assert model.llm_model.training  # follows train(), like upstream's model.train()


def _upstream_forward(model, x: torch.Tensor) -> torch.Tensor:
    """Upstream ``Model.forecast`` spelled out on our modules' weights (eval mode)."""
    mean = x.mean(1, keepdim=True)
    std = torch.sqrt(torch.var(x, dim=1, keepdim=True, unbiased=False) + 1e-5)
    x = (x - mean) / std
    B, T, N = x.shape
    series = x.permute(0, 2, 1).contiguous().reshape(B * N, T, 1)
    prompts = build_prompts_reference(series, model.description, model.seq_len, model.pred_len)
    ids = tokenize_reference(model.tokenizer, prompts)
    prompt_emb = model.llm_model.get_input_embeddings()(ids)
    words = model.llm_model.get_input_embeddings().weight
    source = model.mapping_layer(words.permute(1, 0)).permute(1, 0)
    patches = x.permute(0, 2, 1).contiguous()
    patches = torch.cat([patches, patches[:, :, -1:].repeat(1, 1, 8)], dim=-1).unfold(-1, 16, 8)
    patches = patches.reshape(B * N, patches.shape[2], 16)
    enc = model.patch_embedding.value_embedding(patches)
    enc = model.reprogramming_layer(enc, source, source)
    dec = model.llm_model(inputs_embeds=torch.cat([prompt_emb, enc], 1)).last_hidden_state
    dec = dec[:, :, : model.d_ff].reshape(-1, N, dec.shape[-2], model.d_ff).permute(0, 1, 3, 2)
    dec = model.output_projection(dec[:, :, :, -model.patch_nums :]).permute(0, 2, 1)
    return dec * std + mean


@pytest.mark.parametrize("llm", ["tiny-gpt2", "tiny-bert"])
def test_forward_equals_upstream_math(llm):
    model = build_model(_cfg(llm)).eval()
    x = torch.randn(3, 32, 2) * 5 + 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), _upstream_forward(model, x))


def test_gradients_reach_every_trainable_module_only(gpt2_model):
    gpt2_model.zero_grad(set_to_none=True)
    gpt2_model(torch.randn(2, 32, 1)).sum().backward()
    assert all(p.grad is None for p in gpt2_model.llm_model.parameters())
    assert gpt2_model.mapping_layer.weight.grad.abs().sum() > 0
    assert gpt2_model.patch_embedding.value_embedding.tokenConv.weight.grad.abs().sum() > 0


def test_trainable_state_dict_has_no_llm_tensors_and_round_trips(gpt2_model):
    sd = gpt2_model.trainable_state_dict()
    assert sd and not any(k.startswith("llm_model") for k in sd)
    llm_ptrs = {p.data_ptr() for p in gpt2_model.llm_model.parameters()}
    assert not any(v.data_ptr() in llm_ptrs for v in sd.values())
    n_trainable = sum(p.numel() for p in gpt2_model.trainable_parameters())
    assert sum(v.numel() for v in sd.values()) == n_trainable
    other = build_model(_cfg(seed=7))
    assert not torch.equal(other.mapping_layer.weight, gpt2_model.mapping_layer.weight)
    other.trainable_state().load_state_dict({k: v.clone() for k, v in sd.items()})
    assert torch.equal(other.mapping_layer.weight, gpt2_model.mapping_layer.weight)


def test_load_trainable_state_dict_is_strict(gpt2_model):
    sd = dict(gpt2_model.trainable_state_dict())
    with pytest.raises(IncompatibleCheckpointError, match="missing"):
        gpt2_model.load_trainable_state_dict({k: v for k, v in sd.items() if "mapping" not in k})
    wrong = build_model(_cfg(num_tokens=21)).trainable_state_dict()
    with pytest.raises(IncompatibleCheckpointError, match="shape"):
        gpt2_model.load_trainable_state_dict(wrong)


def test_tiny_build_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(1)
    a = build_model(_cfg())
    after_a = torch.rand(1)
    torch.manual_seed(2)
    b = build_model(_cfg())
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb), na
    assert a.backbone_fingerprint() == b.backbone_fingerprint()
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after_a)  # building consumed none of the caller's RNG


def test_fingerprint_changes_with_backbone(gpt2_model):
    base = gpt2_model.backbone_fingerprint()
    assert set(base) >= {"name", "config_hash", "weights_hash", "tokenizer_hash", "digest"}
    others = [
        load_backbone("tiny-llama", 2).fingerprint(),
        load_backbone("tiny-gpt2", 1).fingerprint(),  # fewer layers
        load_backbone("tiny-gpt2", 2, seed=1).fingerprint(),  # other weights, same config
    ]
    assert len({base["digest"], *(f["digest"] for f in others)}) == 4
    assert others[2]["config_hash"] == base["config_hash"]
    assert others[2]["weights_hash"] != base["weights_hash"]
    # same weights in bf16: the digest is dtype-independent
    assert load_backbone("tiny-gpt2", 2, dtype="bf16").fingerprint()["digest"] == base["digest"]


def test_eval_caches_text_prototypes_until_weights_change(gpt2_model):
    model = gpt2_model.eval()
    x = torch.randn(2, 32, 1)
    with torch.no_grad():
        first = model(x)
        cached = model.text_prototypes()
        assert model.text_prototypes() is cached
        torch.testing.assert_close(model(x), first)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    model.train()
    model(x).sum().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        assert not torch.equal(model.text_prototypes(), cached)
        torch.testing.assert_close(model.text_prototypes(), model._map_vocabulary())
    model.train()


def test_bf16_compute_dtype_runs_on_cpu():
    model = build_model(_cfg(dtype="bf16"))
    assert model.llm_model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.mapping_layer.weight.dtype == torch.float32  # trainable params stay fp32
    out = model(torch.randn(2, 32, 1))
    assert out.dtype == torch.float32 and out.shape == (2, 8, 1)
    out.sum().backward()
    assert model.mapping_layer.weight.grad.dtype == torch.float32


def test_missing_backbone_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="huggingface-cli download") as info:
        load_backbone("no-such-org/no-such-model-xyz", 2)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="login"):
        load_backbone("llama3-8b", 2)


def test_quantize_without_cuda_or_bitsandbytes_is_refused():
    with pytest.raises((ConfigError, MissingDependencyError), match="quantize"):
        load_backbone("tiny-gpt2", 2, quantize="4bit")
    with pytest.raises((ConfigError, MissingDependencyError)):
        load_backbone("llama3-8b", 2, quantize="4bit")


@pytest.mark.parametrize(
    ("field", "value"),
    [("d_ff", 0), ("dtype", "fp8"), ("quantize", "2bit"), ("label_len", 999), ("seq_len", 8),
     ("percent", 0), ("features", "X"), ("dropout", 1.5), ("lradj", "nope")],
)  # fmt: skip
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"TimeLLMConfig.{field}"):
        get_preset("tiny-cpu", **{"label_len": 0, field: value})


def test_presets_and_d_ff_bound():
    tiny = get_preset()
    assert (tiny.name, tiny.llm, tiny.seq_len, tiny.pred_len, tiny.d_model, tiny.d_ff) == (
        "tiny-cpu", "tiny-gpt2", 96, 24, 16, 32,
    )  # fmt: skip
    gpt2 = get_preset("gpt2-etth1")
    assert (gpt2.llm_layers, gpt2.seq_len, gpt2.pred_len, gpt2.batch_size) == (6, 512, 96, 24)
    assert gpt2.patch_nums == 64
    assert TimeLLMConfig.from_dict(gpt2.to_dict()) == gpt2
    with pytest.raises(ConfigError, match="preset"):
        get_preset("nope")
    with pytest.raises(ConfigError, match="no field"):
        tiny.replace(bogus=1)
    with pytest.raises(ConfigError, match="d_ff"):
        build_model(_cfg(d_ff=128))  # tiny LLM hidden size is 64


def test_load_from_local_directory_truncates_and_freezes(tmp_path):
    """The pretrained-loading path (local dir, offline), with a saved tiny model."""
    source = load_backbone("tiny-llama", 2, seed=3)
    source.model.save_pretrained(tmp_path)
    source.tokenizer.save_pretrained(tmp_path)
    loaded = load_backbone(str(tmp_path), 1, dtype="bf16")
    assert loaded.model.config.num_hidden_layers == 1 and len(loaded.model.layers) == 1
    assert loaded.model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in loaded.model.parameters())
    torch.testing.assert_close(
        loaded.model.layers[0].mlp.up_proj.weight.float(),
        source.model.layers[0].mlp.up_proj.weight.to(torch.bfloat16).float(),
    )
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token
    with pytest.raises(ConfigError, match="TimeLLMConfig.dtype"):
        build_model(_cfg(llm=str(tmp_path), llm_layers=1), loaded)
    model = build_model(_cfg(llm=str(tmp_path), llm_layers=1, dtype="bf16"), loaded)
    assert model(torch.randn(2, 32, 1)).shape == (2, 8, 1)
    with pytest.raises(ConfigError, match="llm_layers"):
        load_backbone(str(tmp_path), 3)
