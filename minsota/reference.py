"""Plain-tensor references: every built-in component, block and the whole decoder restated as explicit math
over a module's own parameters (llm.c's habit: the spec is a second, obvious implementation).

A reference never calls the code it checks: no `torch.nn.functional` norms or activations, no SDPA, no
rotary-embedding-torch. Rotary is applied as Meta's original Llama does it (a complex multiply per
interleaved pair), attention as an explicit softmax over a mask built from indices.

How a component finds its reference: its module class carries ``reference``, a function
``reference(module, *forward_args) -> output`` (wrap it in ``staticmethod``); a positional encoding carries
a `PositionalReference` instead. Built-ins point at the functions here; a plugin points at its own, and
tests/test_parity.py — parametrized over the registries — covers it with no new test. Signatures:

  norm, feedforward   (module, x) -> y
  positional          PositionalReference(embed, rotate, bias), each taking the module first
  attention           (module, x, positions, document_ids) -> y
  block               (module, hidden, positions, document_ids) -> hidden   (plain tensors, no TensorDict)
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """Raise AssertionError unless max |actual - expected| <= rtol · max |expected| (relative to the reference's
    scale, so near-zero elements do not demand the impossible); the message gives max and mean abs diff."""
    diff = (actual.detach().double() - expected.detach().double()).abs()
    allowed = rtol * expected.detach().double().abs().max().item()
    if not diff.max().item() <= allowed:
        raise AssertionError(f"{what}: max abs diff {diff.max().item():.3e}, mean abs diff {diff.mean().item():.3e}, "
                             f"allowed {allowed:.3e} ({rtol} relative)")


def of(module: nn.Module):
    """The reference a module's class carries, or None. nn.Identity (an absent norm) is its own."""
    if isinstance(module, nn.Identity):
        return _identity
    return getattr(type(module), "reference", None)


def call(module: nn.Module, *args):
    """Run ``module``'s reference on ``args``; a component without one cannot be part of a reference model."""
    reference = of(module)
    if reference is None:
        raise LookupError(f"{type(module).__name__} has no reference (give its class a `reference` attribute)")
    return reference(module, *args)


def _identity(module, x):
    return x


def linear(layer: nn.Linear, x):
    return x @ layer.weight.T + (0 if layer.bias is None else layer.bias)


# -------------------------------------------------------------------------------------------- norms


def rms_norm(m, x):
    y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + m.eps)
    return y if m.weight is None else y * (getattr(m, "offset", 0.0) + m.weight)


def layer_norm(m, x):
    centered = x - x.mean(-1, keepdim=True)
    y = centered / torch.sqrt(centered.pow(2).mean(-1, keepdim=True) + m.eps)
    y = y * m.weight
    return y if m.bias is None else y + m.bias


# ------------------------------------------------------------------------------------- feed-forwards

ACTIVATIONS = {
    "silu": lambda x: x / (1 + torch.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "relu2": lambda x: torch.clamp(x, min=0) ** 2,
}


def glu(m, x):
    """w2(act(x·w1) * x·w3): a gated feed-forward (SwiGLU, GEGLU) with gate and up fused in ``w13``."""
    gate, up = linear(m.w13, x).chunk(2, dim=-1)
    return linear(m.w2, ACTIVATIONS[m.activation](gate) * up)


def mlp(m, x):
    return linear(m.w2, ACTIVATIONS[m.activation](linear(m.w1, x)))


# -------------------------------------------------------------------------------- positional encodings


@dataclass(frozen=True)
class PositionalReference:
    """The three places a positional encoding acts; unset ones change nothing (as the base class)."""

    embed: Callable = lambda m, x, positions: x
    rotate: Callable = lambda m, q, k, positions: (q, k)
    bias: Callable = lambda m, positions, n_heads: None


def _rotate_pairs(x, angles, scale):
    """Rotate each interleaved pair (x[2i], x[2i+1]) by ``angles[..., i]``: x (B, H, T, hd), angles (B, 1, T, hd/2)."""
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
    rotated = pairs * torch.polar(torch.ones_like(angles), angles)
    return torch.view_as_real(rotated).flatten(-2) * scale


def rope_rotate(m, q, k, positions):
    t = positions.double() / m.interpolate_factor
    angles = (t[..., None] * m.inv_freq.double())[:, None]  # (B, 1, T, hd/2), float64 for a tight truth
    q_scale = k_scale = m.attention_factor
    if m.xpos_scale_base is not None:  # xPos: q scaled by ζ^(n/base), k by its inverse
        power = (t - m.xpos_center) / m.xpos_scale_base  # a fixed centre: see Rope.__init__
        q_scale = (m.xpos_scale.double() ** power[..., None]).repeat_interleave(2, dim=-1)[:, None]
        k_scale = 1 / q_scale
    rotate = lambda x, s: _rotate_pairs(x.double(), angles, s).to(x.dtype)  # noqa: E731
    return rotate(q, q_scale), rotate(k, k_scale)


def learned_embed(m, x, positions):
    return x + m.wpe.weight[positions]


def alibi_bias(m, positions, n_heads):
    """-slope_h · (i - j) for query i and key j, distances measured in positions (restart per document)."""
    distance = positions[:, :, None] - positions[:, None, :]  # (B, T, T)
    return -m.slopes.view(1, n_heads, 1, 1) * distance[:, None].to(m.slopes.dtype)


ROPE = PositionalReference(rotate=rope_rotate)
LEARNED = PositionalReference(embed=learned_embed)
ALIBI = PositionalReference(bias=alibi_bias)
NOPE = PositionalReference()


# ------------------------------------------------------------------------------------------ attention


def attention(m, x, positions, document_ids=None):
    """softmax(q·kᵀ/√hd + bias, capped, masked) · v, with every head's K/V picked by index (GQA)."""
    B, T, _ = x.shape
    H, KV, hd = m.n_heads, m.n_kv_heads, m.head_dim
    q, k, v = linear(m.wqkv, x).split([H * hd, KV * hd, KV * hd], dim=-1)
    if m.qk_norm == "head":
        q, k = q.unflatten(-1, (H, hd)), k.unflatten(-1, (KV, hd))
    q = call(m.q_norm, q).reshape(B, T, H, hd).transpose(1, 2)
    k = call(m.k_norm, k).reshape(B, T, KV, hd).transpose(1, 2)
    v = v.reshape(B, T, KV, hd).transpose(1, 2)
    positional = of(m.positional)
    q, k = positional.rotate(m.positional, q, k, positions)
    kv_head = torch.arange(H, device=x.device) // (H // KV)  # query head h reads K/V head h // group
    scores = q @ k[:, kv_head].transpose(-1, -2)  # (B, H, T, T)
    scores = scores * m.scale if m.scale else scores / math.sqrt(hd)
    bias = positional.bias(m.positional, positions, H)
    if bias is not None:
        scores = scores + bias
    if m.softcap:
        scores = m.softcap * torch.tanh(scores / m.softcap)
    query, key = torch.arange(T, device=x.device)[:, None], torch.arange(T, device=x.device)[None, :]
    visible = (key <= query) & ((query - key < m.window) if m.window else True)
    if document_ids is not None:
        visible = visible & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    y = (weights @ v[:, kv_head]).transpose(1, 2).reshape(B, T, H * hd)
    return linear(m.wo, y)


# --------------------------------------------------------------------------------------------- blocks


def prenorm(b, x, positions, document_ids=None):
    h = x + call(b.attention, call(b.attention_norm, x), positions, document_ids)
    return h + call(b.feed_forward, call(b.ffn_norm, h))


def postnorm(b, x, positions, document_ids=None):
    h = call(b.attention_norm, x + call(b.attention, x, positions, document_ids))
    return call(b.ffn_norm, h + call(b.feed_forward, h))


def parallel(b, x, positions, document_ids=None):
    h = call(b.attention_norm, x)
    return x + call(b.attention, h, positions, document_ids) + call(b.feed_forward, h)


def sandwich(b, x, positions, document_ids=None):
    attended = call(b.attention, call(b.attention_norm, x), positions, document_ids)
    h = x + call(b.attention_out_norm, attended)
    return h + call(b.ffn_out_norm, call(b.feed_forward, call(b.ffn_norm, h)))


# -------------------------------------------------------------------------------------------- decoder


def decoder(model, tokens, positions=None, document_ids=None):
    """(B, T) tokens -> (B, T, vocab) logits of a `minsota.model.Decoder`, from references only."""
    if positions is None:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    x = of(model.positional).embed(model.positional, model.tok_embeddings.weight[tokens] * model.cfg.embed_scale,
                                   positions)
    for layer in model.layers:
        x = call(layer, x, positions, document_ids)
    logits = call(model.norm, x) @ model.output.weight.T
    cap = model.cfg.logit_softcap
    return cap * torch.tanh(logits / cap) if cap else logits
