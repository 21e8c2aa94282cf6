"""Our layer-by-layer Llama forward against transformers' LlamaForCausalLM on tiny random
models: the residual stream, the activations entering every linear map, the final norm and
the logits must agree to float32 rounding; and the config reader refuses what it cannot run."""

from __future__ import annotations

import pytest
import torch
import transformers

from raymerge.zipit.forward import (
    EMBED,
    FINAL_NORM,
    LM_HEAD,
    LlamaShape,
    embed,
    final_hidden,
    layer_forward,
    layer_tensor_names,
    logits,
    model_logits,
    rope_tables,
)

TOL = dict(atol=1e-5, rtol=1e-5)
TOKENS_SHAPE = (2, 17)
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # puts head_dim 16's wavelengths in all 3 bands
}
BASE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, vocab_size=101)
CONFIGS = {
    "gqa": dict(num_key_value_heads=2, num_hidden_layers=2, rope_theta=500000.0),
    "mha_head_dim": dict(
        num_key_value_heads=4, head_dim=32, intermediate_size=172, num_hidden_layers=3
    ),
    "llama3": dict(
        num_key_value_heads=2, num_hidden_layers=2, rope_theta=500000.0, rope_scaling=LLAMA3
    ),
    "tied": dict(num_key_value_heads=2, num_hidden_layers=2, tie_word_embeddings=True),
}


def hf_config(**overrides) -> transformers.LlamaConfig:
    """A tiny config; a large init range makes attention peaked, so masks and RoPE matter."""
    kwargs = dict(BASE, initializer_range=0.2, rms_norm_eps=1e-5, **overrides)
    return transformers.LlamaConfig(attn_implementation="eager", **kwargs)


def hf_model(config: transformers.LlamaConfig, seed: int = 0) -> transformers.LlamaForCausalLM:
    """A random model whose norm weights are random too (they initialize to ones)."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
    return model


def tokens(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, TOKENS_SHAPE, generator=torch.Generator().manual_seed(seed))


def capture_inputs(model: transformers.LlamaForCausalLM) -> tuple[dict, list]:
    """Pre-hooks recording the input of each linear map and of the final norm, keyed by
    (layer, module name); and the hook handles to remove."""
    seen: dict = {}
    handles = []

    def recorder(key):
        def hook(_module, args):
            seen[key] = args[0].detach().clone()

        return hook

    for i, layer in enumerate(model.model.layers):
        for module_name, module in (
            ("q_proj", layer.self_attn.q_proj),
            ("o_proj", layer.self_attn.o_proj),
            ("gate_proj", layer.mlp.gate_proj),
            ("down_proj", layer.mlp.down_proj),
        ):
            handles.append(module.register_forward_pre_hook(recorder((i, module_name))))
    handles.append(model.model.norm.register_forward_pre_hook(recorder("norm_in")))
    norm_out = model.model.norm.register_forward_hook(
        lambda _m, _a, out: seen.__setitem__("norm_out", out.detach().clone())
    )
    return seen, [*handles, norm_out]


def run_hf(model: transformers.LlamaForCausalLM, toks: torch.Tensor):
    seen, handles = capture_inputs(model)
    with torch.no_grad():
        out = model(toks, output_hidden_states=True)
    for handle in handles:
        handle.remove()
    return out, seen


def run_ours(shape: LlamaShape, state: dict, toks: torch.Tensor):
    """Our forward layer by layer: (per-layer features, last layer output)."""
    hidden = embed(state[EMBED], toks)
    rope = rope_tables(shape, toks.shape[1])
    features = []
    for layer in range(shape.layers):
        weights = {role: state[name] for role, name in layer_tensor_names(layer).items()}
        hidden, feats = layer_forward(shape, weights, hidden, rope)
        features.append(feats)
    return features, hidden


def rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_transformers_layer_by_layer(name):
    config = hf_config(**CONFIGS[name])
    model = hf_model(config)
    state = model.state_dict()
    shape = LlamaShape.from_config(config.to_dict())
    toks = tokens(shape.vocab)
    out, seen = run_hf(model, toks)
    features, last = run_ours(shape, state, toks)

    tokens_count = toks.numel()
    for layer, feats in enumerate(features):
        hf_layer = model.model.layers[layer]
        torch.testing.assert_close(feats["residual"], rows(out.hidden_states[layer]), **TOL)
        torch.testing.assert_close(feats["attn_in"], rows(seen[(layer, "q_proj")]), **TOL)
        torch.testing.assert_close(feats["heads"], rows(seen[(layer, "o_proj")]), **TOL)
        torch.testing.assert_close(feats["mlp_in"], rows(seen[(layer, "gate_proj")]), **TOL)
        torch.testing.assert_close(feats["mlp"], rows(seen[(layer, "down_proj")]), **TOL)
        with torch.no_grad():  # silu(gate x) * (up x) by hand from HF's own modules
            x = seen[(layer, "gate_proj")]
            by_hand = torch.nn.functional.silu(hf_layer.mlp.gate_proj(x)) * hf_layer.mlp.up_proj(x)
        torch.testing.assert_close(feats["mlp"], rows(by_hand), **TOL)
        widths = {
            "residual": shape.hidden,
            "attn_in": shape.hidden,
            "heads": shape.heads * shape.head_dim,
            "mlp_in": shape.hidden,
            "mlp": shape.intermediate,
        }
        assert {k: tuple(v.shape) for k, v in feats.items()} == {
            k: (tokens_count, w) for k, w in widths.items()
        }
        assert all(v.dtype == torch.float32 for v in feats.values())

    # hidden_states has layers + 1 entries; in transformers 5 the last one is taken after the
    # final norm, so the last layer's own output is only seen as the norm's input.
    assert len(out.hidden_states) == shape.layers + 1
    torch.testing.assert_close(out.hidden_states[-1], seen["norm_out"], atol=0, rtol=0)
    torch.testing.assert_close(last, seen["norm_in"], **TOL)
    normed = final_hidden(shape, state[FINAL_NORM], last)
    torch.testing.assert_close(normed, seen["norm_out"], **TOL)
    head = state[EMBED] if shape.tie_embeddings else state[LM_HEAD]
    torch.testing.assert_close(logits(state[FINAL_NORM], head, last, shape), out.logits, **TOL)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_model_logits_fetches_by_name(name):
    config = hf_config(**CONFIGS[name])
    model = hf_model(config, seed=3)
    state = dict(model.state_dict())
    shape = LlamaShape.from_config(config.to_dict())
    if shape.tie_embeddings:
        state.pop(LM_HEAD, None)  # a tied checkpoint stores no lm_head
    toks = tokens(shape.vocab, seed=4)
    fetched = []

    def weight(tensor_name: str) -> torch.Tensor:
        fetched.append(tensor_name)
        return state[tensor_name]

    with torch.no_grad():
        expected = model(toks).logits
    got = model_logits(shape, weight, toks)
    assert got.shape == (*TOKENS_SHAPE, shape.vocab) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, **TOL)
    assert set(fetched) | {LM_HEAD} == set(model.state_dict()) | {LM_HEAD}


def test_untied_model_without_lm_head_raises_key_error():
    config = hf_config(**CONFIGS["gqa"])
    state = dict(hf_model(config).state_dict())
    del state[LM_HEAD]
    shape = LlamaShape.from_config(config.to_dict())
    with pytest.raises(KeyError):
        model_logits(shape, state.__getitem__, tokens(shape.vocab))


@pytest.mark.parametrize("name", ["gqa", "llama3"])
def test_rope_tables_match_transformers_beyond_the_original_context(name):
    config = hf_config(**CONFIGS[name])
    model = hf_model(config)
    shape = LlamaShape.from_config(config.to_dict())
    seq = 300
    positions = torch.arange(seq)[None]
    with torch.no_grad():
        hf_cos, hf_sin = model.model.rotary_emb(torch.zeros(1, seq, shape.hidden), positions)
    cos, sin = rope_tables(shape, seq)
    assert cos.shape == (seq, shape.head_dim)
    torch.testing.assert_close(cos, hf_cos[0], **TOL)
    torch.testing.assert_close(sin, hf_sin[0], **TOL)


def test_llama3_scaling_changes_the_tables():
    scaled = LlamaShape.from_config(hf_config(**CONFIGS["llama3"]).to_dict())
    plain = LlamaShape.from_config(hf_config(**CONFIGS["gqa"]).to_dict())
    assert plain.rope_scaling is None and scaled.rope_scaling is not None
    assert not torch.allclose(rope_tables(scaled, 40)[0], rope_tables(plain, 40)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_are_cast_to_float32(dtype):
    config = hf_config(**CONFIGS["gqa"])
    model = hf_model(config)
    low = {k: v.to(dtype) for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.to(torch.float32) for k, v in low.items()})
    shape = LlamaShape.from_config(config.to_dict())
    toks = tokens(shape.vocab)
    with torch.no_grad():
        expected = model(toks).logits
    got = model_logits(shape, low.__getitem__, toks)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, **TOL)
    features, _ = run_ours(shape, low, toks)
    assert all(v.dtype == torch.float32 for f in features for v in f.values())


# ----------------------------------------------------------------------------- config


def test_shape_from_config():
    config = hf_config(**CONFIGS["mha_head_dim"]).to_dict()
    assert LlamaShape.from_config(config) == LlamaShape(
        hidden=64,
        intermediate=172,
        heads=4,
        kv_heads=4,
        head_dim=32,
        layers=3,
        vocab=101,
        rms_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        tie_embeddings=False,
    )


def legacy_config(**overrides) -> dict:
    """A config.json as transformers 4 wrote it: rope_theta and rope_scaling at top level."""
    config = dict(
        BASE, num_key_value_heads=2, num_hidden_layers=2, model_type="llama", rms_norm_eps=1e-5
    )
    config.update(overrides)
    return config


def test_legacy_rope_keys_give_the_same_shape():
    modern = LlamaShape.from_config(hf_config(**CONFIGS["llama3"]).to_dict())
    legacy = LlamaShape.from_config(legacy_config(rope_theta=500000.0, rope_scaling=LLAMA3))
    assert legacy == modern
    assert dict(legacy.rope_scaling)["factor"] == 8.0
    hash(legacy)


def test_defaults_and_accepted_variants():
    minimal = {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_hidden_layers": 1,
        "vocab_size": 10,
    }
    shape = LlamaShape.from_config(minimal)  # no model_type, no optional keys
    assert (shape.kv_heads, shape.head_dim, shape.rms_eps) == (4, 16, 1e-6)
    assert (shape.rope_theta, shape.rope_scaling, shape.tie_embeddings) == (10000.0, None, False)
    mistral = dict(minimal, model_type="mistral", sliding_window=None, head_dim=None)
    assert LlamaShape.from_config(mistral) == shape
    default_rope = dict(minimal, rope_scaling={"type": "default"})
    assert LlamaShape.from_config(default_rope).rope_scaling is None


def without(key: str) -> dict:
    config = legacy_config()
    del config[key]
    return config


REFUSED = {
    "model_type": legacy_config(model_type="gpt2"),
    "hidden_size": without("hidden_size"),
    "intermediate_size": legacy_config(intermediate_size=0),
    "num_hidden_layers": legacy_config(num_hidden_layers=2.0),
    "vocab_size": legacy_config(vocab_size=-5),
    "num_attention_heads": legacy_config(num_attention_heads=True),
    "num_key_value_heads": legacy_config(num_key_value_heads=3),
    "head_dim": legacy_config(head_dim=15),
    "attention_bias": legacy_config(attention_bias=True),
    "mlp_bias": legacy_config(mlp_bias=True),
    "hidden_act": legacy_config(hidden_act="gelu"),
    "rope_scaling": legacy_config(rope_scaling={"type": "linear", "factor": 2.0}),
    "rope_parameters": legacy_config(rope_parameters={"rope_type": "yarn", "factor": 4.0}),
    "factor": legacy_config(rope_scaling={k: v for k, v in LLAMA3.items() if k != "factor"}),
    "sliding_window": legacy_config(model_type="mistral", sliding_window=4096),
}


@pytest.mark.parametrize("key", sorted(REFUSED))
def test_refusals_name_the_key(key):
    with pytest.raises(ValueError, match=key):
        LlamaShape.from_config(REFUSED[key])


def test_layer_tensor_names_cover_the_checkpoint():
    config = hf_config(**CONFIGS["gqa"])
    names = {EMBED, FINAL_NORM, LM_HEAD}
    for layer in range(config.num_hidden_layers):
        names.update(layer_tensor_names(layer).values())
    assert names == set(hf_model(config).state_dict())
    assert layer_tensor_names(7)["q_proj"] == "model.layers.7.self_attn.q_proj.weight"
    assert layer_tensor_names(7)["gate_proj"] == "model.layers.7.mlp.gate_proj.weight"
    assert layer_tensor_names(7)["input_layernorm"] == "model.layers.7.input_layernorm.weight"
