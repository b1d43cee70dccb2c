"""A plugin whose norm loads and registers cleanly but breaks when the model runs: a bug in the plugin."""

from torch import nn

from minsota import hookimpl


class BrokenNorm(nn.Module):
    """A norm that fails in forward."""

    def __init__(self, dim: int, cfg=None):
        super().__init__()

    def forward(self, x):
        return x.view(-1, 7)  # no such shape: raises RuntimeError


@hookimpl
def minsota_register_norms():
    return {"brokennorm": BrokenNorm}
