"""Built-in feed-forward networks: gated (SwiGLU, GEGLU; Shazeer 2020, https://arxiv.org/abs/2002.05202) and
plain two-layer MLPs (GELU as GPT-2; squared ReLU as Primer, So et al. 2021, https://arxiv.org/abs/2109.08668).

GELU is exact by default (``approximate = "none"``, Hendrycks & Gimpel's erf form, as Shazeer's GEGLU);
``approximate = "tanh"`` is the tanh form GPT-2 and Gemma checkpoints were trained with, needed to match them.
"""

import torch.nn.functional as F
from torch import nn

from minsota import hookimpl, reference

ACTIVATIONS = {  # names shared with minsota.reference.ACTIVATIONS, which restates each one
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu2": lambda x: F.relu(x).square(),
}


def gelu(approximate: str) -> str:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return "gelu" if approximate == "none" else "gelu_tanh"


class GatedFeedForward(nn.Module):
    """w2(act(x·w1) * x·w3), gate (w1) and up (w3) fused in ``w13``; hidden 8/3·dim rounded up unless ffn_dim."""

    def __init__(self, cfg, activation: str, hidden: int | None = None):
        super().__init__()
        hidden = hidden or cfg.ffn_width(8 / 3)  # 8/3·dim keeps the parameter count of a 4·dim MLP
        self.activation = activation
        self.w13 = nn.Linear(cfg.dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)
        self.param_splits = {"w13.weight": [hidden, hidden]}  # gate, up: Muon orthogonalises each

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(ACTIVATIONS[self.activation](gate) * up)


class MLP(nn.Module):
    """w2(act(x·w1)); hidden 4·dim rounded up unless ffn_dim is set."""

    def __init__(self, cfg, activation: str, bias: bool = False):
        super().__init__()
        hidden = cfg.ffn_width(4)
        self.activation = activation
        self.w1 = nn.Linear(cfg.dim, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=bias)

    def forward(self, x):
        return self.w2(ACTIVATIONS[self.activation](self.w1(x)))


# One class per component, so each carries the reference that restates its own activation from its options.


class SwiGLU(GatedFeedForward):
    """SwiGLU: w2(silu(x·w1) * x·w3), hidden 8/3·dim (Llama, Mistral) or ``hidden`` (a layer of its own width)."""

    reference = staticmethod(reference.swiglu)

    def __init__(self, cfg, hidden: int | None = None):
        super().__init__(cfg, "silu", hidden)


class GEGLU(GatedFeedForward):
    """GEGLU: w2(gelu(x·w1) * x·w3), hidden 8/3·dim; exact GELU or approximate = "tanh" (Gemma)."""

    reference = staticmethod(reference.geglu)

    def __init__(self, cfg, approximate: str = "none"):
        super().__init__(cfg, gelu(approximate))


class GELUMLP(MLP):
    """GELU MLP: w2(gelu(x·w1)), hidden 4·dim; exact GELU or approximate = "tanh" (GPT-2); optional biases."""

    reference = staticmethod(reference.gelu_mlp)

    def __init__(self, cfg, approximate: str = "none", bias: bool = False):
        super().__init__(cfg, gelu(approximate), bias)


class ReLU2MLP(MLP):
    """Squared-ReLU MLP (Primer): w2(relu(x·w1)²), hidden 4·dim."""

    reference = staticmethod(reference.relu2_mlp)

    def __init__(self, cfg, bias: bool = False):
        super().__init__(cfg, "relu2", bias)


@hookimpl
def minsota_register_feedforwards():
    return {"swiglu": SwiGLU, "geglu": GEGLU, "mlp": GELUMLP, "relu2": ReLU2MLP}
