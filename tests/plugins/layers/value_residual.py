"""Value residual learning (ResFormer; Zhou et al. 2024, https://arxiv.org/abs/2410.17897): every layer after the
first attends over λ·v + (1 - λ)·v0, v0 being layer 0's values, with a learned λ per layer. Layer 0's block
puts v0 into the state (`value_residual`, (B, T, KV, hd)); later blocks read it. Use both:
``--set model.block=value-residual --set model.attention=value-residual``.
"""

import torch
from torch import nn

from minsota import hookimpl
from minsota.builtins.attention import SDPAttention
from minsota.builtins.blocks import PreNormBlock

VALUES = "value_residual"


class ValueResidualAttention(SDPAttention):
    """SDPA attention whose values are mixed with layer 0's (ResFormer)."""

    def __init__(self, cfg, positional, *, norm, layer, **options):
        super().__init__(cfg, positional, norm=norm, **options)
        self.first, self.v0 = layer == 0, None  # v0: this call's tokens' values of layer 0, (B, KV, T, hd)
        self.mix = None if self.first else nn.Parameter(torch.tensor(0.5))  # λ

    def attend(self, q, k, v, positions, document_ids):  # v (B, KV, Tk, hd): this call's are the newest T
        new = q.shape[-2]
        if self.first:
            self.v0 = v[:, :, -new:]
        else:
            v = torch.cat([v[:, :, :-new], self.mix * v[:, :, -new:] + (1 - self.mix) * self.v0], dim=2)
            if self.kv_cache is not None:  # decoding: cache the mixed values (earlier tokens' v0 is gone)
                self.kv_cache.v = v
        return super().attend(q, k, v, positions, document_ids)


class ValueResidualBlock(PreNormBlock):
    """Pre-norm block carrying layer 0's attention values to the later layers through the state."""

    reference = None  # a block reference sees no state: its parity lives in the tests

    def forward(self, state):
        if not self.attention.first:
            self.attention.v0 = state[VALUES].transpose(1, 2)
        state = super().forward(state)
        if self.attention.first:
            state[VALUES] = self.attention.v0.transpose(1, 2)  # (B, T, KV, hd): batch dims first
        return state


@hookimpl
def minsota_register_attentions():
    return {"value-residual": ValueResidualAttention}


@hookimpl
def minsota_register_blocks():
    return {"value-residual": ValueResidualBlock}
