"""An auxiliary loss: SwiGLU that adds coefficient · mean(hidden²) of its gated hidden activations to the training
objective (an activation-magnitude penalty, as used against activation outliers). The term is logged as
`ffn_activation_l2`, summed over layers. ``--set 'model.feedforward={name="activation-penalty", coefficient=1e-3}'``.
"""

from minsota import hookimpl
from minsota.builtins.feedforward import ACTIVATIONS, GatedFeedForward


class PenalisedSwiGLU(GatedFeedForward):
    """SwiGLU with an auxiliary coefficient · mean(hidden²) loss term."""

    aux_loss_name = "ffn_activation_l2"

    def __init__(self, cfg, coefficient: float = 1e-3):
        super().__init__(cfg, "silu")
        self.coefficient = coefficient

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        hidden = ACTIVATIONS[self.activation](gate) * up
        self.aux_loss = self.coefficient * hidden.float().square().mean()
        return self.w2(hidden)


@hookimpl
def minsota_register_feedforwards():
    return {"activation-penalty": PenalisedSwiGLU}
