"""x0 mixing (modded-nanogpt, Jordan et al. 2024): each block's input becomes λ·h + μ·x0, where x0 is the first
block's input (the state's `embeddings`) and λ, μ are learned scalars per block, from λ = 1, μ = 0 (the plain
pre-norm block). ``--set model.block=x0-prenorm``.
"""

import torch
from torch import nn

from minsota import hookimpl
from minsota.builtins.blocks import PreNormBlock
from minsota.state import EMBEDDINGS, HIDDEN


class X0PreNormBlock(PreNormBlock):
    """Pre-norm block whose input mixes in the embeddings: λ·h + μ·x0 (modded-nanogpt)."""

    reference = None  # its reference would need the embeddings, which a block reference does not get

    def __init__(self, cfg, **components):
        super().__init__(cfg, **components)
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))  # (λ, μ)

    def forward(self, state):
        state[HIDDEN] = self.lambdas[0] * state[HIDDEN] + self.lambdas[1] * state[EMBEDDINGS]
        return super().forward(state)


@hookimpl
def minsota_register_blocks():
    return {"x0-prenorm": X0PreNormBlock}
