"""Built-in norms: RMSNorm (Zhang & Sennrich 2019, as in Llama/Mistral)."""

import torch
import torch.nn.functional as F
from torch import nn

from minsota import hookimpl


class RMSNorm(nn.Module):
    """RMSNorm with a learned gain; statistics in fp32 (as HF Llama), result cast back to the input dtype."""

    def __init__(self, dim: int, cfg=None, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)


@hookimpl
def minsota_register_norms():
    return {"rmsnorm": RMSNorm}
