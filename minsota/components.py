"""The bases and protocols a plugin author subclasses: the core's half of the component contracts.

Plugins (the built-ins in `plugins/` included) import these from the core and never each other, as
torchtune's ``modules/`` never imports its ``models/``. The hooks that register components
(`minsota.hookspecs`) name them:

  PositionalEncoding   what a positional encoding may change: the embeddings, q and k, the scores' bias
  Attention            the shared projections (fused ``wqkv``, ``wo``), QK-norm and positional encoding;
                       a kernel subclasses it and supplies ``attend``; it counts its own FLOPs
                       (``flops_per_token``, with `attention_flops` for the scores and values)
  KVCache              the cache protocol of cached decoding: while an attention module's ``kv_cache`` is
                       set, its forward appends the new keys and values (``update``) and attends over all
"""

import torch
from torch import nn

from minsota import reference


class PositionalEncoding(nn.Module):
    """Base class of positional encodings; the default changes nothing (NoPE)."""

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Applied to the token embeddings (B, T, D); learned/absolute encodings add here."""
        return x

    def rotate(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        """Applied to q (B, H, T, hd) and k (B, KV, T, hd) inside attention; rotary encodings act here."""
        return q, k

    def bias(self, positions: torch.Tensor, n_heads: int) -> torch.Tensor | None:
        """An additive attention-score bias (B|1, H, T, T), or None."""
        return None

    def score_mod(self, positions: torch.Tensor):
        """The same bias as a flex_attention ``score_mod(score, b, h, i, j)``, or None: kernels that take one
        (CUDA's flex path) then never build the dense (B, H, T, T) tensor."""
        return None


class KVCache:
    """The keys, values and positions one attention layer has seen so far in this generation."""

    def __init__(self):
        self.k = self.v = self.positions = None

    def update(self, k, v, positions):
        """Append the new tokens' k, v (B, KV, T, hd) and positions (B, T); return everything cached."""
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
            positions = torch.cat([self.positions, positions], dim=1)
        self.k, self.v, self.positions = k, v, positions
        return k, v, positions


class Attention(nn.Module):
    """Projections, QK-norm and positional encoding; subclasses supply the kernel (`attend`).

    Cached decoding (`minsota.generation`): while ``kv_cache`` is set, forward appends the new tokens' keys,
    values and positions to it and attends over all of them, so `attend` gets q (B, H, Tq, hd) for the last
    Tq of the Tk positions of k and v (B, KV, Tk, hd), and ``positions`` (B, Tk) of the keys. Tq = Tk always
    in training, which never sets the cache.
    """

    reference = staticmethod(reference.attention)
    kv_cache = None  # a KVCache, only while generating (minsota.generation)

    def __init__(
        self,
        cfg,
        positional,
        *,
        norm,
        bias: bool = False,
        qk_norm: str = "none",
        window: int = 0,
        softcap: float = 0.0,
        scale: float | None = None,
    ):
        super().__init__()
        if qk_norm not in ("none", "head", "full"):
            raise ValueError(f"qk_norm must be 'none', 'head' or 'full', got {qk_norm!r}")
        if window < 0 or softcap < 0:
            raise ValueError("window and softcap must be >= 0")
        if scale is not None and scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        H, KV, hd = self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qk_norm, self.window, self.softcap = qk_norm, window, softcap
        self.scale = None if scale is None else float(scale)  # scores q·k·scale; None: the kernels' own 1/sqrt(hd)
        self.wqkv = nn.Linear(cfg.dim, (H + 2 * KV) * hd, bias=bias)
        self.wo = nn.Linear(H * hd, cfg.dim, bias=bias)
        self.param_splits = {"wqkv.weight": [H * hd, KV * hd, KV * hd]}  # q, k, v: Muon orthogonalises each
        # the features one norm sees: a head, or the whole projection ("full"); (B, T, groups, width) views
        self.q_width, self.k_width = (H * hd, KV * hd) if qk_norm == "full" else (hd, hd)
        has_norm = qk_norm != "none"
        self.q_norm = norm(self.q_width) if has_norm else nn.Identity()
        self.k_norm = norm(self.k_width) if has_norm else nn.Identity()
        object.__setattr__(self, "positional", positional)  # shared: the decoder owns (and moves) it

    def forward(self, x, positions, document_ids=None):
        B, T, _ = x.shape
        H, KV, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv(x).split([H * hd, KV * hd, KV * hd], dim=-1)
        q = self.q_norm(q.view(B, T, -1, self.q_width)).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_norm(k.view(B, T, -1, self.k_width)).view(B, T, KV, hd).transpose(1, 2)  # (B, KV, T, hd)
        v = v.view(B, T, KV, hd).transpose(1, 2)
        q, k = self.positional.rotate(q, k, positions)
        if self.kv_cache is not None:  # generating: the earlier tokens' keys and values come from the cache
            k, v, positions = self.kv_cache.update(k, v, positions)
        y = self.attend(q, k, v, positions, document_ids)  # (B, H, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * hd))  # (B, T, D)

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token: the projections (2 per weight) and the scores and values over the keys this
        layer sees (its own window)."""
        weights = self.wqkv.weight.numel() + self.wo.weight.numel()
        return 2 * weights + attention_flops(self.n_heads, self.head_dim, seq_len, self.window)


def attention_flops(n_heads: int, head_dim: int, seq_len: int, window: int = 0) -> float:
    """Forward FLOPs per token of causal attention's scores and values: 4·hd per visible key and query head, with
    T/2 keys on average when causal and W − W²/2T under a sliding window of W."""
    window = min(window or seq_len, seq_len)
    keys = window - window * window / (2 * seq_len)  # mean over queries of min(i, W) keys, i = 1..T
    return 4 * n_heads * head_dim * keys
