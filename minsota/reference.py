"""Plain-tensor references: every built-in component, block and the whole decoder restated as explicit math
over a module's own parameters (llm.c's habit: the spec is a second, obvious implementation).

A reference restates the math from what the recipe asked for — the `minsota.model.Spec` the builder records
on each component (``module.spec``: registry name, model config, options as written), with each option's
default restated here — never from values the module computed (its eps, frequencies, scales or activation):
a module that ignores an option then disagrees with its reference. Only the learned parameters are read.

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
        raise AssertionError(
            f"{what}: max abs diff {diff.max().item():.3e}, mean abs diff {diff.mean().item():.3e}, "
            f"allowed {allowed:.3e} ({rtol} relative)"
        )


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


def spec(module: nn.Module):
    """The `minsota.model.Spec` recorded when ``module`` was built (`minsota.model.build_component`)."""
    if not hasattr(module, "spec"):
        raise LookupError(
            f"{type(module).__name__} was not built through minsota.model.build_component: its "
            f"reference has no recipe options to restate"
        )
    return module.spec


def option(module: nn.Module, key: str, default):
    """The recipe's option ``key`` for ``module``, or the component's documented default."""
    return spec(module).options.get(key, default)


def linear(layer: nn.Linear, x, bias: bool = False):
    """x·Wᵀ (+ b when the recipe asks for a bias; a layer without the asked one, or with an unasked one, fails)."""
    if bias != (layer.bias is not None):
        raise AssertionError(
            f"the recipe asks for bias = {bias}, the layer has {'a' if layer.bias is not None else 'no'} bias"
        )
    return x @ layer.weight.T + (layer.bias if bias else 0)


# -------------------------------------------------------------------------------------------- norms


def rms_norm(m, x):
    y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + option(m, "eps", 1e-5))
    return y if m.weight is None else y * (option(m, "offset", 0.0) + m.weight)


def layer_norm(m, x):
    centered = x - x.mean(-1, keepdim=True)
    y = centered / torch.sqrt(centered.pow(2).mean(-1, keepdim=True) + option(m, "eps", 1e-5))
    y = y * m.weight
    return y + m.bias if option(m, "bias", True) else y


# ------------------------------------------------------------------------------------- feed-forwards

ACTIVATIONS = {
    "silu": lambda x: x / (1 + torch.exp(-x)),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "relu2": lambda x: torch.clamp(x, min=0) ** 2,
}


def _gelu(m) -> str:
    return "gelu_tanh" if option(m, "approximate", "none") == "tanh" else "gelu"


def _glu(m, x, activation: str):
    """w2(act(x·w1) * x·w3): a gated feed-forward with gate and up fused in ``w13``."""
    gate, up = linear(m.w13, x).chunk(2, dim=-1)
    return linear(m.w2, ACTIVATIONS[activation](gate) * up)


def _mlp(m, x, activation: str):
    bias = option(m, "bias", False)
    return linear(m.w2, ACTIVATIONS[activation](linear(m.w1, x, bias)), bias)


def swiglu(m, x):
    return _glu(m, x, "silu")


def geglu(m, x):
    return _glu(m, x, _gelu(m))


def gelu_mlp(m, x):
    return _mlp(m, x, _gelu(m))


def relu2_mlp(m, x):
    return _mlp(m, x, "relu2")


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


def _llama3(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """Llama 3.1 by wavelength (as Meta's reference code states it): long ones ÷ factor, short ones kept, a
    linear blend in original/wavelength between."""
    scaled = []
    for f in inv_freq.tolist():
        wavelength = 2 * math.pi / f
        if wavelength > original_max_position_embeddings / low_freq_factor:
            scaled.append(f / factor)
        elif wavelength < original_max_position_embeddings / high_freq_factor:
            scaled.append(f)
        else:
            smooth = (original_max_position_embeddings / wavelength - low_freq_factor) / (
                high_freq_factor - low_freq_factor
            )
            scaled.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(scaled, dtype=torch.float64)


def _yarn(
    inv_freq,
    theta,
    head_dim,
    factor,
    original_max_position_embeddings,
    beta_fast=32.0,
    beta_slow=1.0,
    attention_factor=None,
    truncate=True,
):
    """YaRN (Peng et al. 2023 §3.2-3.4): frequency index i blends from kept (turning > beta_fast times over the
    original context) to interpolated (< beta_slow), linearly over the indices between; q, k scaled by
    0.1·ln(factor) + 1 unless attention_factor is given."""

    def index(turns):  # solves original · θ^(-2i/hd) = 2π · turns for i
        return head_dim * math.log(original_max_position_embeddings / (2 * math.pi * turns)) / (2 * math.log(theta))

    low, high = index(beta_fast), index(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    blended = []
    for i, f in enumerate(inv_freq.tolist()):
        ramp = min(1.0, max(0.0, (i - low) / ((high - low) or 1e-3)))
        blended.append(f * (1 - ramp) + f / factor * ramp)
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1 if factor > 1 else 1.0
    return torch.tensor(blended, dtype=torch.float64), attention_factor


def rope_frequencies(m) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (hd/2,) in float64, q/k scale) from the recipe's RoPE options."""
    options, hd = dict(spec(m).options), spec(m).cfg.head_dim
    theta = options.pop("theta", 10000.0)
    # NTK-aware scaling (bloc97): θ · s^(hd / (hd - 2)) stretches the longest wavelength by s, keeps the shortest
    rescaled = theta * options.pop("theta_rescale_factor", 1.0) ** (hd / (hd - 2))
    inv_freq = rescaled ** -(torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    scaling = options.pop("scaling", None)
    for key in ("interpolate_factor", "use_xpos", "xpos_scale_base"):
        options.pop(key, None)
    if scaling == "llama3":
        return _llama3(inv_freq, **options), 1.0
    if scaling == "yarn":
        return _yarn(inv_freq, theta, hd, **options)
    return inv_freq, 1.0


def rope_rotate(m, q, k, positions):
    interpolate = option(m, "interpolate_factor", 1.0)
    t = positions.double() / interpolate  # position interpolation (Chen et al. 2023)
    inv_freq, q_scale = rope_frequencies(m)
    k_scale = q_scale
    angles = (t[..., None] * inv_freq.to(q.device))[:, None]  # (B, 1, T, hd/2), float64 for a tight truth
    if option(m, "use_xpos", False):  # xPos (Sun et al. 2022): q scaled by ζ_i^((t - c)/base), k by its inverse
        hd = spec(m).cfg.head_dim
        zeta = (torch.arange(0, hd, 2, dtype=torch.float64, device=q.device) + 0.4 * hd) / (1.4 * hd)
        centre = spec(m).cfg.max_seq_len // 2 / interpolate  # fixed mid-context (see Rope.__init__)
        power = (t - centre) / option(m, "xpos_scale_base", 512.0)
        q_scale = (zeta ** power[..., None]).repeat_interleave(2, dim=-1)[:, None]
        k_scale = 1 / q_scale
    rotate = lambda x, s: _rotate_pairs(x.double(), angles, s).to(x.dtype)  # noqa: E731
    return rotate(q, q_scale), rotate(k, k_scale)


def learned_embed(m, x, positions):
    return x + m.wpe.weight[positions]


def alibi_bias(m, positions, n_heads):
    """-slope_h · (i - j) for query i and key j, distances measured in positions (restart per document). Slopes
    2^(-8h/n) for h = 1..n when n is a power of two; otherwise those of the power p below n, then 2^(-4(2j+1)/p)
    for j = 0.. (the odd-numbered slopes of 2p heads; Press et al. 2021 §3)."""
    p = 2 ** int(math.log2(n_heads))
    slopes = [2 ** (-8 * h / p) for h in range(1, p + 1)] + [2 ** (-4 * (2 * j + 1) / p) for j in range(n_heads - p)]
    distance = positions[:, :, None] - positions[:, None, :]  # (B, T, T)
    return -torch.tensor(slopes).view(1, n_heads, 1, 1) * distance[:, None].float()


ROPE = PositionalReference(rotate=rope_rotate)
LEARNED = PositionalReference(embed=learned_embed)
ALIBI = PositionalReference(bias=alibi_bias)
NOPE = PositionalReference()


# ------------------------------------------------------------------------------------------ attention


def attention(m, x, positions, document_ids=None):
    """softmax(q·kᵀ/√hd + bias, capped, masked) · v, with every head's K/V picked by index (GQA)."""
    B, T, _ = x.shape
    cfg, bias, qk_norm = spec(m).cfg, option(m, "bias", False), option(m, "qk_norm", "none")
    window, softcap, scale = option(m, "window", 0), option(m, "softcap", 0.0), option(m, "scale", None)
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q, k, v = linear(m.wqkv, x, bias).split([H * hd, KV * hd, KV * hd], dim=-1)
    if qk_norm == "head":
        q, k = q.unflatten(-1, (H, hd)), k.unflatten(-1, (KV, hd))
    q = call(m.q_norm, q).reshape(B, T, H, hd).transpose(1, 2)
    k = call(m.k_norm, k).reshape(B, T, KV, hd).transpose(1, 2)
    v = v.reshape(B, T, KV, hd).transpose(1, 2)
    positional = of(m.positional)
    q, k = positional.rotate(m.positional, q, k, positions)
    kv_head = torch.arange(H, device=x.device) // (H // KV)  # query head h reads K/V head h // group
    scores = q @ k[:, kv_head].transpose(-1, -2)  # (B, H, T, T)
    scores = scores * scale if scale else scores / math.sqrt(hd)  # the recipe's scale, else 1/√hd
    score_bias = positional.bias(m.positional, positions, H)
    if score_bias is not None:
        scores = scores + score_bias
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    query, key = torch.arange(T, device=x.device)[:, None], torch.arange(T, device=x.device)[None, :]
    visible = (key <= query) & ((query - key < window) if window else True)
    if document_ids is not None:
        visible = visible & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    y = (weights @ v[:, kv_head]).transpose(1, 2).reshape(B, T, H * hd)
    return linear(m.wo, y, bias)


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
    pre = (lambda norm, x: call(norm, x)) if option(b, "pre", True) else (lambda norm, x: x)  # OLMo 2: no input norms
    attended = call(b.attention, pre(b.attention_norm, x), positions, document_ids)
    h = x + call(b.attention_out_norm, attended)
    return h + call(b.ffn_out_norm, call(b.feed_forward, pre(b.ffn_norm, h)))


# -------------------------------------------------------------------------------------------- decoder


def decoder(model, tokens, positions=None, document_ids=None):
    """(B, T) tokens -> (B, T, vocab) logits of a `minsota.model.Decoder`, from references only."""
    if positions is None:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    x = of(model.positional).embed(
        model.positional, model.tok_embeddings.weight[tokens] * model.cfg.embed_scale, positions
    )
    for layer in model.layers:
        x = call(layer, x, positions, document_ids)
    logits = call(model.norm, x) @ model.output.weight.T
    cap = model.cfg.logit_softcap
    return cap * torch.tanh(logits / cap) if cap else logits
