"""A small float32 forward of a Hugging Face Llama-style decoder, one layer at a time.

ZipIt and RegMean need the activations that feed each linear map (the inputs of q/k/v, of
o_proj, of gate/up and of down_proj) and the residual stream between layers. Running our own
forward lets a worker stream one layer's weights at a time, never hold the whole model, and
hand back exactly those activations as `[tokens, width]` rows.

Everything is computed in float32 on the device of the activations; weights may arrive in
any float dtype and on any device and are cast and moved as they are used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from raymerge.zipit.shape import (  # noqa: F401  (the names callers use, in one place)
    EMBED,
    FINAL_NORM,
    LM_HEAD,
    LlamaShape,
    layer_tensor_names,
)


def _f32(weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The weight as float32 on the activations' device (no copy when it already is)."""
    return weight.to(device=like.device, dtype=torch.float32)


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm in float32: x / sqrt(mean(x^2) + eps), then scaled by the weight."""
    hidden = hidden.to(torch.float32)
    scale = torch.rsqrt(hidden.pow(2).mean(dim=-1, keepdim=True) + eps)
    return hidden * scale * _f32(weight, hidden)


def embed(weight: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Look up the token rows, [B, S, d] float32 on tokens' device; only the rows used are
    cast, never the whole vocabulary matrix."""
    rows = F.embedding(tokens.to(weight.device), weight)
    return rows.to(device=tokens.device, dtype=torch.float32)


def _inverse_frequencies(shape: LlamaShape) -> torch.Tensor:
    """RoPE's per-pair inverse frequencies, [head_dim / 2] float32."""
    exponents = torch.arange(0, shape.head_dim, 2, dtype=torch.int64).to(torch.float32)
    inv_freq = 1.0 / (shape.rope_theta ** (exponents / shape.head_dim))
    if shape.rope_scaling is not None:
        inv_freq = _llama3_scaled(inv_freq, dict(shape.rope_scaling))
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's frequency rescaling: wavelengths longer than the original context / low
    factor are slowed down by `factor`, those shorter than context / high factor are kept,
    and the band in between is interpolated linearly in context / wavelength."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    ramp = ((context / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    return inv_freq / factor * (1.0 - ramp) + inv_freq * ramp


def rope_tables(
    shape: LlamaShape, seq_len: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each [seq_len, head_dim] float32, for positions 0..seq_len-1, laid out
    for the half-split rotation (the two halves of a head share frequencies)."""
    inv_freq = _inverse_frequencies(shape).to(device)
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Apply the rotary embedding to [..., S, head_dim]: each pair (i, i + hd/2) turns by its
    position's angle."""
    cos, sin = rope
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def _split_heads(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """[B, S, heads * hd] -> [B, heads, S, hd]."""
    batch, seq, _ = x.shape
    return x.view(batch, seq, heads, head_dim).transpose(1, 2)


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention with a causal mask. q is [B, KV, G, S, hd] and k, v are
    [B, KV, 1, S, hd]: each key/value head serves its G query heads by broadcasting, so the
    repeated keys and values are never materialized. Returns [B, KV, G, S, hd]."""
    seq = q.shape[-2]
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    future = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v)


def _attention_heads(
    shape: LlamaShape,
    weights: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """The per-head attention output, concatenated in head order: [B, S, H * hd], the
    input of o_proj."""
    batch, seq, _ = x.shape
    hd, kv, group = shape.head_dim, shape.kv_heads, shape.group
    rope = (rope[0][:seq].to(x.device), rope[1][:seq].to(x.device))
    q = _rotate(_split_heads(F.linear(x, _f32(weights["q_proj"], x)), shape.heads, hd), rope)
    k = _rotate(_split_heads(F.linear(x, _f32(weights["k_proj"], x)), kv, hd), rope)
    v = _split_heads(F.linear(x, _f32(weights["v_proj"], x)), kv, hd)
    out = _causal_attention(
        q.reshape(batch, kv, group, seq, hd), k.unsqueeze(2), v.unsqueeze(2)
    )  # query head h = kv_head * group + g, as in HF's repeat_kv
    return out.reshape(batch, shape.heads, seq, hd).transpose(1, 2).reshape(batch, seq, -1)


def _mlp_hidden(weights: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """silu(gate x) * (up x): the input of down_proj, [B, S, I]."""
    gate = F.linear(x, _f32(weights["gate_proj"], x))
    return F.silu(gate) * F.linear(x, _f32(weights["up_proj"], x))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, S, w] -> [B * S, w]: one row per token."""
    return x.reshape(-1, x.shape[-1])


def layer_forward(
    shape: LlamaShape,
    weights: Mapping[str, torch.Tensor],
    hidden: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run one decoder layer; return the hidden state after it and the activations entering
    each of its linear maps, as float32 [tokens, width] rows."""
    residual = hidden.to(torch.float32)
    attn_in = rms_norm(residual, weights["input_layernorm"], shape.rms_eps)
    heads = _attention_heads(shape, weights, attn_in, rope)
    after_attn = residual + F.linear(heads, _f32(weights["o_proj"], heads))
    mlp_in = rms_norm(after_attn, weights["post_attention_layernorm"], shape.rms_eps)
    mlp = _mlp_hidden(weights, mlp_in)
    out = after_attn + F.linear(mlp, _f32(weights["down_proj"], mlp))
    features = dict(residual=residual, attn_in=attn_in, heads=heads, mlp_in=mlp_in, mlp=mlp)
    return out, {name: _rows(value) for name, value in features.items()}


def final_hidden(
    shape: LlamaShape, norm_weight: torch.Tensor, hidden: torch.Tensor
) -> torch.Tensor:
    """The final RMSNorm, whose output feeds lm_head."""
    return rms_norm(hidden, norm_weight, shape.rms_eps)


def logits(
    norm_weight: torch.Tensor,
    lm_head_weight: torch.Tensor,
    hidden: torch.Tensor,
    shape: LlamaShape,
) -> torch.Tensor:
    """Final norm then lm_head: [B, S, V] float32 logits from the last layer's output."""
    normed = final_hidden(shape, norm_weight, hidden)
    return F.linear(normed, _f32(lm_head_weight, normed))


def _lm_head(shape: LlamaShape, weight: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """lm_head.weight, or the embedding when the model ties them and stores no lm_head."""
    try:
        return weight(LM_HEAD)
    except KeyError:
        if not shape.tie_embeddings:
            raise
        return weight(EMBED)


def model_logits(
    shape: LlamaShape, weight: Callable[[str], torch.Tensor], tokens: torch.Tensor
) -> torch.Tensor:
    """The whole model's logits, fetching each layer's tensors only while that layer runs."""
    hidden = embed(weight(EMBED), tokens)
    rope = rope_tables(shape, tokens.shape[-1], device=hidden.device)
    for layer in range(shape.layers):
        layer_weights = {role: weight(name) for role, name in layer_tensor_names(layer).items()}
        hidden, _ = layer_forward(shape, layer_weights, hidden, rope)
        del layer_weights  # so the next layer's tensors do not arrive while these are held
    return logits(weight(FINAL_NORM), _lm_head(shape, weight), hidden, shape)
