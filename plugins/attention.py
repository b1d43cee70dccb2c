"""Built-in attention kernels: `sdpa` (torch's fused scaled-dot-product attention; flash where the device has it).

Grouped-query attention (Ainslie et al. 2023) by ``cfg.n_kv_heads``: K/V are never copied per query head,
SDPA's ``enable_gqa`` broadcasts them. Q, K and V come from one fused projection ``wqkv``.
"""

import torch
import torch.nn.functional as F
from torch import nn

from minsota import hookimpl


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) bool: causal and within the same document."""
    T = document_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    return (causal & same_doc)[:, None]


class SDPAttention(nn.Module):
    """Causal multi-/grouped-query attention through F.scaled_dot_product_attention."""

    def __init__(self, cfg, positional):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        object.__setattr__(self, "positional", positional)  # shared: the decoder owns (and moves) it

    def forward(self, x, positions, document_ids=None):
        B, T, _ = x.shape
        H, KV, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv(x).split([H * hd, KV * hd, KV * hd], dim=-1)
        q = q.view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, KV, hd).transpose(1, 2)  # (B, KV, T, hd)
        v = v.view(B, T, KV, hd).transpose(1, 2)
        q, k = self.positional.rotate(q, k, positions)
        mask = None if document_ids is None else document_causal_mask(document_ids)
        bias = self.positional.bias(positions, H)
        if bias is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril() if mask is None else mask
            mask = bias.masked_fill(~causal, float("-inf")).to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=KV != H)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * hd))  # (B, T, D)


@hookimpl
def minsota_register_attentions():
    return {"sdpa": SDPAttention}
