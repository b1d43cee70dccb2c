"""A test plugin that poisons one training step, the way a real divergence would show up.

Feed-forward ``poison`` is a plain linear map. At its ``at_step``-th training forward (one micro-batch per
step in the tests) it turns its output into NaN (``where = "loss"``: the loss is NaN) or its gradient
(``where = "grad"``: the loss is finite, the gradient norm is not). Evaluation and sampling (no grad) never
count. Used as ``--plugin tests/assets/nan_plugin.py --set 'model.feedforward={name="poison", at_step=3}'``.
"""

import torch
from torch import nn

import minsota


class NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class Poison(nn.Module):
    instances = []  # every one built, so a test can inspect the live parameters after training stopped

    def __init__(self, cfg, at_step: int, where: str = "loss"):
        super().__init__()
        Poison.instances.append(self)
        self.w2 = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.at_step, self.where, self.calls = at_step, where, 0

    def forward(self, x):
        y = self.w2(x)
        if not (self.training and torch.is_grad_enabled()):
            return y
        self.calls += 1
        if self.calls != self.at_step:
            return y
        return y * float("nan") if self.where == "loss" else NaNGradient.apply(y)


@minsota.hookimpl
def minsota_register_feedforwards():
    return {"poison": Poison}
