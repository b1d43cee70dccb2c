"""Built-in feed-forward networks: SwiGLU (Shazeer 2020, https://arxiv.org/abs/2002.05202) and the GELU MLP."""

import torch.nn.functional as F
from torch import nn

from minsota import hookimpl


class SwiGLU(nn.Module):
    """SwiGLU: w2(silu(x·w1) * x·w3); hidden 8/3·dim rounded up to ffn_multiple_of unless ffn_dim is set."""

    def __init__(self, cfg):
        super().__init__()
        hidden = cfg.ffn_width(8 / 3)
        self.w13 = nn.Linear(cfg.dim, 2 * hidden, bias=False)  # gate (w1) and up (w3) in one GEMM
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class MLP(nn.Module):
    """GELU MLP: w2(gelu(x·w1)); hidden 4·dim unless ffn_dim is set; GELU exact or tanh-approximated."""

    def __init__(self, cfg, approximate: str = "none", bias: bool = False):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        hidden = cfg.ffn_width(4)
        self.approximate = approximate
        self.w1 = nn.Linear(cfg.dim, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=bias)

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x), approximate=self.approximate))


@hookimpl
def minsota_register_feedforwards():
    return {"swiglu": SwiGLU, "mlp": MLP}
