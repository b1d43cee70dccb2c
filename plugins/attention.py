"""Built-in attention kernels: `sdpa` (torch's fused scaled-dot-product attention; flash where the device has
it) and `math` (an explicit softmax(QK^T/sqrt(hd))V: the slow truth, and the only kernel that soft-caps).

Both share one module: a fused ``wqkv`` projection, optional QK-norm, the decoder's positional encoding and
``wo``. Options (keys of the ``model.attention`` inline table):
  bias = true        q/k/v and output projection biases (GPT-2)
  qk_norm = "head"   the recipe's norm over each head's q and k (Qwen 3, Gemma 3; Dehghani et al. 2023,
                     https://arxiv.org/abs/2302.05442); "full": over the whole q and k projections (OLMo 2,
                     https://arxiv.org/abs/2501.00656); "none" (default)
  window = N         sliding-window attention: each token sees itself and the N-1 tokens before it (Mistral)
  softcap = C        scores become C·tanh(scores/C) before masking (Gemma 2); `math` only, since the fused
                     kernels have no hook on the scores
  scale = S          scores are q·k·S (default 1/sqrt(head_dim)); Gemma's query_pre_attn_scalar Q is S = Q^-0.5
Grouped-query attention (Ainslie et al. 2023) by ``cfg.n_kv_heads`` (1 = MQA): SDPA broadcasts K/V with
``enable_gqa``, never copying them per query head, except in fp32 on CUDA, where only SDPA's math kernel takes
GQA: there K/V are expanded so that the memory-efficient kernel runs.

Masks: causal; with ``document_ids`` (packed batches) also within one document; with ``window`` also within
it. Plain causal attention takes SDPA's flash path. Otherwise CPU builds a dense boolean mask (flex_attention
has no CPU backward in this torch) and CUDA uses flex_attention, which skips fully masked blocks; compiled
even when the model is not (eager flex materialises the whole (T, T) score matrix). A positional encoding
with a score bias (ALiBi) gives CUDA's flex path a ``score_mod`` and the dense paths its (B, H, T, T) bias.
"""

import functools

import torch
import torch.nn.functional as F

from minsota import hookimpl
from minsota.components import Attention

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch < 2.5: the dense mask serves CUDA too
    flex_attention = None


def visible_keys(T: int, document_ids, window: int, device, queries: int | None = None) -> torch.Tensor:
    """(B|1, 1, queries, T) bool: key j is visible to query i (causal, same document, within the window). The
    queries are the newest ``queries`` positions (all T by default; fewer in cached decoding, whose rows alone
    are built: one row per generated token, not a T×T mask)."""
    queries = queries or T
    i, j = torch.arange(T - queries, T, device=device), torch.arange(T, device=device)
    distance = i[:, None] - j[None, :]
    mask = (distance >= 0) & (distance < window) if window else distance >= 0
    if document_ids is None:
        return mask[None, None]
    return mask & (document_ids[:, None, -queries:, None] == document_ids[:, None, None, :])


@functools.cache
def compiled(fn):
    """torch.compile(fn), made once. Eager flex_attention is an unfused fallback that materialises the whole
    (B, H, T, T) score matrix, and eager create_block_mask the whole (B, 1, T, T) mask; compiled, neither
    does. Inside an outer torch.compile the plain functions are traced instead (see `_call`)."""
    return torch.compile(fn)


def _call(fn, *args, **kwargs):
    return (fn if torch.compiler.is_compiling() else compiled(fn))(*args, **kwargs)


def block_mask(document_ids, window: int, T: int, device):
    """flex_attention's BlockMask: causal, within documents and the window (built by each layer: compiled, it
    costs a (B, T/128, T/128) block table, small beside the attention it steers)."""

    def mask_mod(b, h, i, j):
        keep = (i >= j) & ((i - j < window) if window else True)
        return keep if document_ids is None else keep & (document_ids[b, i] == document_ids[b, j])

    B = document_ids.shape[0] if document_ids is not None else None
    return _call(create_block_mask, mask_mod, B, None, T, T, device=device)


def flex_attend(q, k, v, document_ids, window: int, score_mod=None, scale: float | None = None):
    """Causal attention within documents and the window, with a positional ``score_mod`` (ALiBi's), through
    flex_attention, compiled (CUDA; forward also on CPU)."""
    mask = block_mask(document_ids, window, q.shape[-2], q.device)
    return _call(
        flex_attention, q, k, v, score_mod=score_mod, block_mask=mask, enable_gqa=q.shape[1] != k.shape[1], scale=scale
    )


class SDPAttention(Attention):
    """Causal multi-/grouped-query attention through F.scaled_dot_product_attention (flash when unmasked)."""

    def __init__(self, cfg, positional, *, norm, softcap: float = 0.0, **options):
        if softcap:
            raise ValueError(
                "attention 'sdpa' cannot soft-cap scores (its fused kernels have no hook on them); "
                'use attention = { name = "math", softcap = ... }'
            )
        super().__init__(cfg, positional, norm=norm, **options)

    def attend(self, q, k, v, positions, document_ids):
        gqa, T = self.n_kv_heads != self.n_heads, k.shape[-2]
        if gqa and q.is_cuda and q.dtype == torch.float32:  # CUDA's fp32 GQA is math-only: memory-efficient instead
            k, v, gqa = *(x.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1) for x in (k, v)), False
        window = self.window if self.window < T else 0  # a window as long as the sequence hides nothing
        fused = q.shape[-2] == T  # the causal and flex paths align queries with keys: not so in cached decoding
        score_mod = self.positional.score_mod(positions)
        if fused and q.is_cuda and flex_attention is not None and (score_mod or document_ids is not None or window):
            return flex_attend(q, k, v, document_ids, window, score_mod, self.scale)  # ALiBi too: no (T, T) bias
        bias = self.positional.bias(positions, self.n_heads)
        if fused and bias is None and document_ids is None and not window:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, scale=self.scale)
        mask = visible_keys(T, document_ids, window, q.device, q.shape[-2])
        if bias is not None:  # the queries' rows: the newest (all of them but in cached decoding)
            mask = bias[..., -q.shape[-2] :, :].masked_fill(~mask, float("-inf")).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=self.scale)


class MathAttention(Attention):
    """Explicit softmax(QK^T/sqrt(hd) + bias)V: the slow truth; the kernel that soft-caps scores (Gemma 2)."""

    def attend(self, q, k, v, positions, document_ids):
        group = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, T, hd)
        queries, T = q.shape[-2], k.shape[-2]  # queries are the newest rows (fewer only in cached decoding)
        scores = q @ k.transpose(-1, -2) * (self.scale or self.head_dim**-0.5)  # (B, H, queries, T)
        bias = self.positional.bias(positions, self.n_heads)
        if bias is not None:
            scores = scores + bias[..., -queries:, :]
        if self.softcap:
            scores = self.softcap * torch.tanh(scores / self.softcap)
        visible = visible_keys(T, document_ids, self.window, q.device, queries)
        scores = scores.masked_fill(~visible, float("-inf"))
        return torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v


@hookimpl
def minsota_register_attentions():
    return {"sdpa": SDPAttention, "math": MathAttention}
