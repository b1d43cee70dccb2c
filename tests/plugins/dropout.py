"""A feed-forward that draws random numbers every training step: SwiGLU with dropout on its hidden units
(Srivastava et al. 2014). Nothing else in training draws after initialisation, so this is what lets a test
see whether a resume restores the RNG state."""

import torch.nn.functional as F
from torch import nn

from minsota import hookimpl


class DropoutSwiGLU(nn.Module):
    """SwiGLU with dropout on the gated hidden units (training only)."""

    def __init__(self, cfg, p: float = 0.1):
        super().__init__()
        hidden = cfg.ffn_width(8 / 3)
        self.p = p
        self.w13 = nn.Linear(cfg.dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.dropout(F.silu(gate) * up, self.p, self.training))


@hookimpl
def minsota_register_feedforwards():
    return {"swiglu-dropout": DropoutSwiGLU}
