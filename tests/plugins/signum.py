"""A third-party optimizer and schedule, through minsota's hooks only: Signum (signSGD with momentum, Bernstein
et al. 2018, arXiv:1802.04434) whose state mixes a tensor, an int and a nested dict, and a step-decay schedule."""

import torch

import minsota


class Signum(torch.optim.Optimizer):
    def __init__(self, groups, lr: float, momentum: float):
        super().__init__(groups, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                buffer = state.setdefault("momentum", torch.zeros_like(p))
                buffer.lerp_(p.grad, 1 - group["momentum"])
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(buffer.sign(), alpha=-group["lr"])
                state["steps"] = state.get("steps", 0) + 1  # non-tensor state: saved as JSON
                state["last"] = {"lr": group["lr"], "role": group["role"]}


@minsota.hookimpl
def minsota_register_optimizers():
    def signum(groups, cfg, momentum: float = 0.9):
        """Signum: the sign of an EMA of gradients."""
        if not 0 <= momentum < 1:  # refused when the recipe is read: minsota builds this on stand-in tensors
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        return Signum(groups, cfg.lr, momentum)

    return {"signum": signum}


@minsota.hookimpl
def minsota_register_schedules():
    def halving(cfg, every: int = 4):
        """Halve the lr every `every` steps."""
        return lambda step: 0.5 ** (step // every)

    return {"halving": halving}
