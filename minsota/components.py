"""The bases and protocols a plugin author subclasses: the core's half of the component contracts.

Plugins (the built-ins in `plugins/` included) import these from the core and never each other, as
torchtune's ``modules/`` never imports its ``models/``. The hooks that register components
(`minsota.hookspecs`) name them:

  PositionalEncoding   what a positional encoding may change: the embeddings, q and k, the scores' bias
  Attention            the shared projections (fused ``wqkv``, ``wo``), QK-norm and positional encoding;
                       a kernel subclasses it and supplies ``attend``
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

    def __init__(self, cfg, positional, *, norm, bias: bool = False, qk_norm: str = "none", window: int = 0,
                 softcap: float = 0.0):
        super().__init__()
        if qk_norm not in ("none", "head", "full"):
            raise ValueError(f"qk_norm must be 'none', 'head' or 'full', got {qk_norm!r}")
        if window < 0 or softcap < 0:
            raise ValueError("window and softcap must be >= 0")
        H, KV, hd = self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qk_norm, self.window, self.softcap = qk_norm, window, softcap
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
