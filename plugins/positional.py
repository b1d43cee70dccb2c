"""Built-in positional encodings: rotary (RoPE, via rotary-embedding-torch), learned absolute, ALiBi, none (NoPE).

RoPE: Su et al. 2021, https://arxiv.org/abs/2104.09864. Position interpolation: Chen et al. 2023,
https://arxiv.org/abs/2306.15595 (``interpolate_factor``). xPos extrapolation: Sun et al. 2022,
https://arxiv.org/abs/2212.10554 (``use_xpos``). NTK-aware scaling: ``theta_rescale_factor``. The scaling
schemes real checkpoints use, which the library cannot express, are written here and chosen with
``scaling``: "llama3" (Llama 3.1, https://arxiv.org/abs/2407.21783) and "yarn" (Peng et al. 2023,
https://arxiv.org/abs/2309.00071); their options sit beside it in the inline table, named as in HF configs:

    positional = { name = "rope", theta = 500000.0, scaling = "llama3", factor = 8.0, low_freq_factor = 1.0,
                   high_freq_factor = 4.0, original_max_position_embeddings = 8192 }

rotary-embedding-torch builds its position tensor in the input's dtype, so under bf16 autocast
positions past 256 collapse (bf16 has 8 mantissa bits) and the bad angles get cached. We therefore
take only the inverse frequencies (and xPos scales) from the library, compute angles in fp32 from
the per-token positions ourselves, and apply them with the library's `apply_rotary_emb`. The library
pairs features interleaved (2i, 2i+1) like Meta's Llama; HF checkpoints rotate halves, which
`minsota.hf` reconciles by permuting q/k rows.
"""

import math

import torch
from rotary_embedding_torch import RotaryEmbedding, apply_rotary_emb
from torch import nn

from minsota import hookimpl, reference
from minsota.components import PositionalEncoding


def llama3_frequencies(
    inv_freq, factor: float, low_freq_factor: float, high_freq_factor: float, original_max_position_embeddings: int
):
    """Llama 3.1: wavelengths longer than original/low_freq_factor are interpolated (÷ factor), those shorter
    than original/high_freq_factor kept, and the band between blended linearly in original/wavelength."""
    turns = original_max_position_embeddings * inv_freq / (2 * math.pi)  # rotations over the original context
    keep = ((turns - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0, 1)
    return keep * inv_freq + (1 - keep) * inv_freq / factor


def yarn_frequencies(
    inv_freq,
    theta: float,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    attention_factor: float | None = None,
    truncate: bool = True,
):
    """YaRN "NTK-by-parts": frequency i is kept if it turns more than beta_fast times over the original
    context, interpolated (÷ factor) if fewer than beta_slow, blended by a ramp over the index between.
    Returns (inverse frequencies, attention factor): q and k are both scaled by the factor, which defaults to
    the paper's temperature 0.1·ln(factor) + 1 (§3.4)."""
    head_dim = 2 * inv_freq.shape[-1]

    def index_turning(turns):  # the (fractional) frequency index i with θ^(-2i/hd)·L = 2π·turns
        return head_dim * math.log(original_max_position_embeddings / (2 * math.pi * turns)) / (2 * math.log(theta))

    low, high = index_turning(beta_fast), index_turning(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    index = torch.arange(inv_freq.shape[-1], dtype=torch.float32, device=inv_freq.device)
    interpolate = ((index - low) / ((high - low) or 1e-3)).clamp(0, 1)
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1 if factor > 1 else 1.0
    return inv_freq / factor * interpolate + inv_freq * (1 - interpolate), attention_factor


class Rope(PositionalEncoding):
    """Rotary position embedding (interpolation, NTK, Llama 3.1 and YaRN scaling, xPos), angles in fp32."""

    reference = reference.ROPE

    def __init__(
        self,
        cfg,
        theta: float = 10000.0,
        interpolate_factor: float = 1.0,
        theta_rescale_factor: float = 1.0,
        use_xpos: bool = False,
        xpos_scale_base: float = 512.0,
        scaling: str | None = None,
        **scaling_options,
    ):
        super().__init__()
        if interpolate_factor < 1:
            raise ValueError(f"interpolate_factor must be >= 1, got {interpolate_factor}")
        if scaling is None and scaling_options:
            raise ValueError(f"unknown option(s) {', '.join(scaling_options)} (scaling options need scaling = ...)")
        if scaling is not None and (interpolate_factor != 1 or theta_rescale_factor != 1 or use_xpos):
            raise ValueError(f"scaling = {scaling!r} replaces interpolate_factor, theta_rescale_factor and use_xpos")
        rotary = RotaryEmbedding(
            cfg.head_dim,
            theta=theta,
            interpolate_factor=interpolate_factor,
            theta_rescale_factor=theta_rescale_factor,
            use_xpos=use_xpos,
            xpos_scale_base=xpos_scale_base,
            cache_if_possible=False,
        )
        inv_freq = rotary.freqs.detach().float().clone()  # (hd/2,)
        self.interpolate_factor = interpolate_factor
        self.attention_factor = 1.0
        if scaling == "llama3":
            inv_freq = llama3_frequencies(inv_freq, **scaling_options)
        elif scaling == "yarn":
            inv_freq, self.attention_factor = yarn_frequencies(inv_freq, theta, **scaling_options)
            self.yarn_factor = scaling_options["factor"]  # DeepSeek's MLA corrects its softmax scale by it
        elif scaling is not None:
            raise ValueError(f"scaling must be 'llama3' or 'yarn', got {scaling!r}")
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.xpos_scale_base = xpos_scale_base if use_xpos else None
        # xPos scales q by ζ^((t - c)/base) and k by its inverse, so q·k depends on t_q - t_k alone whatever the
        # centre c; but c must not change between calls: a KV cache keeps keys scaled at the centre of the call
        # that made them. Mid-context keeps the scales symmetric (the library centres on each call's length).
        self.xpos_center = cfg.max_seq_len // 2 / interpolate_factor  # in the units of t (rotate)
        if use_xpos:
            self.register_buffer("xpos_scale", rotary.scale.detach().float().clone(), persistent=False)

    def rotate(self, q, k, positions):
        with torch.autocast(q.device.type, enabled=False):
            t = positions.float() / self.interpolate_factor  # (B, T) in fp32 whatever the autocast dtype
            freqs = (t[..., None] * self.inv_freq).repeat_interleave(2, dim=-1)[:, None]  # (B, 1, T, hd)
            q_scale = k_scale = self.attention_factor
            if self.xpos_scale_base is not None:
                power = (t - self.xpos_center) / self.xpos_scale_base
                q_scale = (self.xpos_scale ** power[..., None]).repeat_interleave(2, dim=-1)[:, None]
                k_scale = q_scale.reciprocal()
            return apply_rotary_emb(freqs, q, scale=q_scale), apply_rotary_emb(freqs, k, scale=k_scale)


class LearnedPositions(PositionalEncoding):
    """Learned absolute position embeddings (GPT-2): a (max_seq_len, dim) table added to the token embeddings."""

    reference = reference.LEARNED

    def __init__(self, cfg):
        super().__init__()
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.dim)

    def embed(self, x, positions):
        return x + self.wpe(positions)


def alibi_slopes(n_heads: int) -> list[float]:
    """The geometric head slopes 2^(-8/n), 2^(-16/n), ... of ALiBi; for a head count that is not a power of
    two, those of the next lower power of two followed by every other slope of twice that (the paper's §3)."""
    if n_heads & (n_heads - 1) == 0:
        return [2 ** (-8 * (h + 1) / n_heads) for h in range(n_heads)]
    lower = 2 ** int(math.log2(n_heads))
    return alibi_slopes(lower) + alibi_slopes(2 * lower)[0::2][: n_heads - lower]


class ALiBi(PositionalEncoding):
    """ALiBi (Press et al. 2021, https://arxiv.org/abs/2108.12409): scores get -slope_h · distance."""

    reference = reference.ALIBI

    def __init__(self, cfg):
        super().__init__()
        self.register_buffer("slopes", torch.tensor(alibi_slopes(cfg.n_heads)), persistent=False)  # (H,)

    def bias(self, positions, n_heads):
        distance = (positions[:, :, None] - positions[:, None, :]).float()  # (B, T, T): query minus key position
        return -self.slopes[:, None, None] * distance[:, None]  # (B, H, T, T)

    def score_mod(self, positions):
        slopes = self.slopes

        def alibi(score, b, h, i, j):
            return score - slopes[h] * (positions[b, i] - positions[b, j]).float()

        return alibi


class NoPE(PositionalEncoding):
    """No positional encoding (NoPE; Kazemnejad et al. 2023): causal masking alone carries order."""

    reference = reference.NOPE

    def __init__(self, cfg):
        super().__init__()


@hookimpl
def minsota_register_positional_encodings():
    return {"rope": Rope, "learned": LearnedPositions, "alibi": ALiBi, "none": NoPE}
