"""A depth-dependent component: SwiGLU whose output projection starts at std/sqrt(2·(layer + 1)), the depth-scaled
init of OLMo 1's "mitchell" scheme (and of T-Fixup's spirit), instead of one residual std for every layer.
It gets its depth as ``layer=`` and owns its init (``init_weights``). ``--set model.feedforward=depth-swiglu``.
"""

import math

from torch import nn

from minsota import hookimpl
from minsota.builtins.feedforward import GatedFeedForward


class DepthScaledSwiGLU(GatedFeedForward):
    """SwiGLU with a depth-scaled output init: w2 ~ N(0, std/sqrt(2·(layer + 1)))."""

    reference = None  # the math is SwiGLU's; what differs is the init, checked in the tests

    def __init__(self, cfg, layer: int):
        super().__init__(cfg, "silu")
        self.layer = layer

    def init_weights(self, std: float, residual_std: float):
        nn.init.normal_(self.w13.weight, 0.0, std)
        nn.init.normal_(self.w2.weight, 0.0, std / math.sqrt(2 * (self.layer + 1)))


@hookimpl
def minsota_register_feedforwards():
    return {"depth-swiglu": DepthScaledSwiGLU}
