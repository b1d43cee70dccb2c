"""The `mla` attention: multi-head latent attention (DeepSeek-V2, https://arxiv.org/abs/2405.04434 §2.1; V3,
https://arxiv.org/abs/2412.19437).

Keys and values come from one compressed latent per token, c = norm(x·W_dkv) of ``kv_lora_rank`` features,
up-projected per head (``wkv_b``: kv_lora_rank -> H·(qk_nope_head_dim + v_head_dim)); positions reach attention
only through decoupled rotary slices: each query head has ``qk_rope_head_dim`` rotated features and all heads share
one rotated key head, computed from x beside the latent (``wkv_a`` gives both). Options (the ``model.attention``
inline table):
  q_lora_rank = 0            0: a plain query projection ``wq``; > 0: a low-rank one, ``wq_b(norm(wq_a(x)))``
  kv_lora_rank = 4·head_dim  the latent's width
  qk_nope_head_dim           each head's unrotated q/k width (default 2·model.head_dim)
  qk_rope_head_dim           each head's rotated q/k width: it must equal ``model.head_dim``, the width the
                             recipe's positional encoding rotates (so with mla, ``head_dim`` is the rope width)
  v_head_dim                 each head's value width (default qk_nope_head_dim)
  mscale_all_dim = 0.0       DeepSeek's YaRN softmax correction: with rope ``scaling = "yarn"`` of factor s the
                             scale (qk_nope + qk_rope)^-1/2 is multiplied by (0.1·mscale_all_dim·ln s + 1)²
Queries and keys are scored over their full width qk_nope + qk_rope, so the softmax scale is that width^-1/2.

Masks: causal, and within documents under document packing (a dense boolean mask, as `sdpa` builds on CPU).
A positional score bias (ALiBi) is added as in `sdpa`. A sliding window (``window``) is refused when the recipe is
built, naming `mla` and `sdpa` (which has one). QK-norm has no meaning here (the latent is normed instead).

Cached decoding (`minsota generate`) keeps the latent and the rotated shared key, kv_lora_rank + qk_rope_head_dim
numbers per token and layer (DeepSeek-V3: 576, against 2·128·192 of full keys and values), in the
`minsota.components.KVCache` protocol (its ``k`` the latent, its ``v`` the rope key), and attends with the
up-projections absorbed into the query and the output (V2 §2.1.2): q_nope·W_UK scores against the latent directly,
and the weighted latent goes through W_UV, so no per-head key or value is ever rebuilt.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from minsota import hookimpl, reference
from minsota.components import attention_flops


def attention_mask(T: int, queries: int, document_ids, bias) -> torch.Tensor | None:
    """SDPA's mask for the newest ``queries`` of T positions: None where plain causal attention over aligned queries
    serves, else (B|1, 1|H, queries, T), bool (causal, within documents) or the positional bias (ALiBi) with -inf
    where hidden."""
    if document_ids is None and queries == T and bias is None:
        return None
    device = bias.device if bias is not None else None if document_ids is None else document_ids.device
    i, j = torch.arange(T - queries, T, device=device)[:, None], torch.arange(T, device=device)[None, :]
    mask = (j <= i)[None, None]
    if document_ids is not None:
        mask = mask & (document_ids[:, None, -queries:, None] == document_ids[:, None, None, :])
    return mask if bias is None else bias[..., -queries:, :].masked_fill(~mask, float("-inf"))


def mla_reference(m, x, positions, document_ids=None):
    """Per-head keys and values rebuilt from the latent, an explicit softmax over an index-built mask."""
    B, T, _ = x.shape
    H = m.n_heads
    q = (
        reference.linear(m.wq_b, reference.call(m.q_norm, reference.linear(m.wq_a, x)))
        if m.q_lora_rank
        else reference.linear(m.wq, x)
    )
    q = q.reshape(B, T, H, -1).transpose(1, 2)
    kv = reference.linear(m.wkv_a, x)
    latent, k_rope = reference.call(m.kv_norm, kv[..., : m.kv_lora_rank]), kv[..., m.kv_lora_rank :]
    q_rope, k_rope = reference.of(m.positional).rotate(m.positional, q[..., m.nope :], k_rope[:, None], positions)
    kv = reference.linear(m.wkv_b, latent).reshape(B, T, H, -1).transpose(1, 2)
    k = torch.cat([kv[..., : m.nope], k_rope.expand(B, H, T, m.rope)], dim=-1)
    scores = torch.cat([q[..., : m.nope], q_rope], dim=-1) @ k.transpose(-1, -2) * m.scale  # (B, H, T, T)
    bias = reference.of(m.positional).bias(m.positional, positions, H)
    scores = scores if bias is None else scores + bias
    query, key = torch.arange(T)[:, None], torch.arange(T)[None, :]
    visible = key <= query
    if document_ids is not None:
        visible = visible & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return reference.linear(m.wo, (weights @ kv[..., m.nope :]).transpose(1, 2).reshape(B, T, -1))


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek's MLA; full per-head keys and values in training, the absorbed latent form with a cache."""

    reference = staticmethod(mla_reference)
    kv_cache = None  # a minsota.components.KVCache of (latent, rope key), only while generating

    def __init__(
        self,
        cfg,
        positional,
        *,
        norm,
        q_lora_rank: int = 0,
        kv_lora_rank: int | None = None,
        qk_nope_head_dim: int | None = None,
        qk_rope_head_dim: int | None = None,
        v_head_dim: int | None = None,
        mscale_all_dim: float = 0.0,
        window: int = 0,
    ):
        super().__init__()
        rope = qk_rope_head_dim or cfg.head_dim
        if rope != cfg.head_dim:
            raise ValueError(
                f"qk_rope_head_dim ({rope}) must equal model.head_dim ({cfg.head_dim}): the positional "
                f"encoding rotates head_dim features"
            )
        if window:
            raise ValueError("attention 'mla' has no sliding window: use attention = { name = \"sdpa\", window = ... }")
        H = self.n_heads = cfg.n_heads
        self.q_lora_rank, self.kv_lora_rank = q_lora_rank, kv_lora_rank or 4 * cfg.head_dim
        self.nope, self.rope = qk_nope_head_dim or 2 * cfg.head_dim, rope
        self.v_dim = v_head_dim or self.nope
        qk = self.nope + self.rope
        if q_lora_rank:
            self.wq_a = nn.Linear(cfg.dim, q_lora_rank, bias=False)
            self.q_norm = norm(q_lora_rank)
            self.wq_b = nn.Linear(q_lora_rank, H * qk, bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, H * qk, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, self.kv_lora_rank + self.rope, bias=False)
        self.kv_norm = norm(self.kv_lora_rank)
        self.wkv_b = nn.Linear(self.kv_lora_rank, H * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(H * self.v_dim, cfg.dim, bias=False)
        factor = getattr(positional, "yarn_factor", 1.0)
        mscale = 0.1 * mscale_all_dim * math.log(factor) + 1 if mscale_all_dim and factor > 1 else 1.0
        self.scale = qk**-0.5 * mscale**2
        object.__setattr__(self, "positional", positional)  # shared: the decoder owns (and moves) it

    def project(self, x, positions):
        """q_nope (B, H, T, nope), rotated q_rope (B, H, T, rope), the normed latent (B, T, r) and the rotated
        shared key (B, 1, T, rope)."""
        B, T, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_lora_rank else self.wq(x)
        q_nope, q_rope = q.view(B, T, self.n_heads, -1).transpose(1, 2).split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope], dim=-1)
        q_rope, k_rope = self.positional.rotate(q_rope, k_rope[:, None], positions)
        return q_nope, q_rope, self.kv_norm(latent), k_rope

    def forward(self, x, positions, document_ids=None):
        B, T, _ = x.shape
        q_nope, q_rope, latent, k_rope = self.project(x, positions)
        if self.kv_cache is not None:
            return self.wo(self.absorbed(q_nope, q_rope, latent, k_rope, positions))
        k_nope, v = self.wkv_b(latent).view(B, T, self.n_heads, -1).transpose(1, 2).split([self.nope, self.v_dim], -1)
        q = torch.cat([q_nope, q_rope], dim=-1)  # (B, H, T, nope + rope)
        k = torch.cat([k_nope, k_rope.expand(-1, self.n_heads, -1, -1)], dim=-1)
        mask = attention_mask(T, T, document_ids, self.positional.bias(positions, self.n_heads))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)

    def absorbed(self, q_nope, q_rope, latent, k_rope, positions):
        """Cached decoding over the latent: W_UK folded into the queries, W_UV applied after the weighting."""
        B, H, Tq, _ = q_nope.shape
        latent, k_rope, positions = self.kv_cache.update(latent[:, None], k_rope, positions)  # (B, 1, Tk, r | rope)
        w_uk, w_uv = self.wkv_b.weight.view(H, self.nope + self.v_dim, -1).split([self.nope, self.v_dim], dim=1)
        q_latent = q_nope @ w_uk  # (B, H, Tq, r): q_nope·W_UK, scored against the latent itself
        q = torch.cat([q_latent, q_rope], dim=-1)
        k = torch.cat([latent, k_rope], dim=-1)  # (B, 1, Tk, r + rope): one key head for all query heads
        bias = self.positional.bias(positions, H)
        mask = (
            attention_mask(k.shape[-2], Tq, None, bias)
            if bias is not None
            else torch.ones(Tq, k.shape[-2], dtype=torch.bool, device=q.device).tril(k.shape[-2] - Tq)
        )
        y = F.scaled_dot_product_attention(q, k, latent, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return (y @ w_uv.transpose(1, 2)).transpose(1, 2).reshape(B, Tq, -1)  # (B, Tq, H·v)

    def flops_per_token(self, seq_len: int) -> float:
        """2 per projection weight, and causal scores over nope + rope features and values over v_head_dim."""
        weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 2 * weights + attention_flops(self.n_heads, (self.nope + self.rope + self.v_dim) / 2, seq_len)

    def cache_numbers_per_token(self) -> int:
        """What cached decoding keeps per token in this layer: the latent and the shared rope key."""
        return self.kv_lora_rank + self.rope


@hookimpl
def minsota_register_attentions():
    return {"mla": MultiHeadLatentAttention}
