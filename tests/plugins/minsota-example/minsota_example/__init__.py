"""Example third-party minsota plugin: a norm, a feed-forward and a recipe that uses both."""

from importlib.resources import files

import torch
from torch import nn

from minsota import hookimpl


class ScaleNorm(nn.Module):
    """ScaleNorm: g · x / ||x|| with one learned scalar (Nguyen & Salazar 2019, arXiv:1910.05895)."""

    def __init__(self, dim, cfg, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.tensor(dim**0.5))

    def forward(self, x):
        return self.g * x / x.norm(dim=-1, keepdim=True).clamp_min(self.eps)


class Bilinear(nn.Module):
    """Bilinear GLU without activation: w2(x·w1 * x·w3) (Shazeer 2020, arXiv:2002.05202)."""

    def __init__(self, cfg, ratio: float = 8 / 3):
        super().__init__()
        hidden = cfg.ffn_width(ratio)
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)

    def forward(self, x):
        return self.w2(self.w1(x) * self.w3(x))


@hookimpl
def minsota_register_norms():
    return {"scalenorm": ScaleNorm}


@hookimpl
def minsota_register_feedforwards():
    return {"bilinear": Bilinear}


@hookimpl
def minsota_register_recipes():
    return {"tiny-example": files("minsota_example") / "tiny-example.toml"}
