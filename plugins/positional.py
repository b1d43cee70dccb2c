"""Built-in positional encodings: rotary (RoPE, via rotary-embedding-torch) and none (NoPE).

RoPE: Su et al. 2021, https://arxiv.org/abs/2104.09864. Position interpolation: Chen et al. 2023,
https://arxiv.org/abs/2306.15595 (``interpolate_factor``). xPos extrapolation: Sun et al. 2022,
https://arxiv.org/abs/2212.10554 (``use_xpos``). NTK-aware scaling: ``theta_rescale_factor``.

rotary-embedding-torch builds its position tensor in the input's dtype, so under bf16 autocast
positions past 256 collapse (bf16 has 8 mantissa bits) and the bad angles get cached. We therefore
take only the inverse frequencies (and xPos scales) from the library, compute angles in fp32 from
the per-token positions ourselves, and apply them with the library's `apply_rotary_emb`. The library
pairs features interleaved (2i, 2i+1) like Meta's Llama; HF checkpoints rotate halves, which
`minsota.hf` reconciles by permuting q/k rows.
"""

import torch
from rotary_embedding_torch import RotaryEmbedding, apply_rotary_emb

from minsota import hookimpl
from minsota.model import PositionalEncoding


class Rope(PositionalEncoding):
    """Rotary position embedding (interpolation, NTK scaling, xPos), angles in fp32."""

    def __init__(self, cfg, theta: float = 10000.0, interpolate_factor: float = 1.0,
                 theta_rescale_factor: float = 1.0, use_xpos: bool = False, xpos_scale_base: float = 512.0):
        super().__init__()
        if interpolate_factor < 1:
            raise ValueError(f"interpolate_factor must be >= 1, got {interpolate_factor}")
        rotary = RotaryEmbedding(cfg.head_dim, theta=theta, interpolate_factor=interpolate_factor,
                                 theta_rescale_factor=theta_rescale_factor, use_xpos=use_xpos,
                                 xpos_scale_base=xpos_scale_base, cache_if_possible=False)
        self.interpolate_factor = interpolate_factor
        self.xpos_scale_base = xpos_scale_base if use_xpos else None
        self.register_buffer("inv_freq", rotary.freqs.detach().float().clone(), persistent=False)  # (hd/2,)
        if use_xpos:
            self.register_buffer("xpos_scale", rotary.scale.detach().float().clone(), persistent=False)

    def rotate(self, q, k, positions):
        with torch.autocast(q.device.type, enabled=False):
            t = positions.float() / self.interpolate_factor  # (B, T) in fp32 whatever the autocast dtype
            freqs = (t[..., None] * self.inv_freq).repeat_interleave(2, dim=-1)[:, None]  # (B, 1, T, hd)
            if self.xpos_scale_base is None:
                return apply_rotary_emb(freqs, q), apply_rotary_emb(freqs, k)
            power = (t - positions.shape[-1] // 2) / self.xpos_scale_base
            scale = (self.xpos_scale ** power[..., None]).repeat_interleave(2, dim=-1)[:, None]
            return apply_rotary_emb(freqs, q, scale=scale), apply_rotary_emb(freqs, k, scale=scale.reciprocal())


class NoPE(PositionalEncoding):
    """No positional encoding (NoPE; Kazemnejad et al. 2023): causal masking alone carries order."""

    def __init__(self, cfg):
        super().__init__()


@hookimpl
def minsota_register_positional_encodings():
    return {"rope": Rope, "none": NoPE}
