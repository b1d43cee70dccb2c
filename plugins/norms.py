"""Built-in norms: RMSNorm (Zhang & Sennrich 2019, https://arxiv.org/abs/1910.07467; Llama, Mistral; with
``offset = 1.0`` Gemma's (1 + w) gain), its parameter-free variant (OLMo's non-parametric norm,
https://arxiv.org/abs/2402.00838) and LayerNorm (Ba et al. 2016; with bias as GPT-2, without as PaLM). Statistics and the affine parameters are applied in
fp32 whatever the input dtype, and the result is cast back to the input dtype (bf16 in, bf16 out).
"""

import torch
import torch.nn.functional as F
from torch import nn

from minsota import hookimpl, reference


class RMSNorm(nn.Module):
    """RMSNorm with a learned gain; statistics and the gain in fp32, the result cast back to the input dtype
    (so a bf16 input under autocast gives bf16: q/k through QK-norm keep v's dtype).

    ``offset``: the gain is ``offset + weight``, the weight starting at ``1 - offset`` (a gain of 1 either way).
    Gemma's norms are (1 + w) with w from 0 (offset = 1.0), so weight decay pulls the gain towards 1, not 0.
    """

    reference = staticmethod(reference.rms_norm)

    def __init__(self, dim: int, cfg=None, eps: float = 1e-5, gain: bool = True, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset)) if gain else None

    def forward(self, x):
        weight = None if self.weight is None else self.weight.float()
        if self.offset and weight is not None:
            weight = weight + self.offset
        return F.rms_norm(x.float(), (x.shape[-1],), weight, self.eps).type_as(x)


def rmsnorm_noparam(dim: int, cfg=None, eps: float = 1e-5) -> RMSNorm:
    """RMSNorm without a gain (no parameters)."""
    return RMSNorm(dim, cfg, eps, gain=False)


class LayerNorm(nn.LayerNorm):
    """LayerNorm with a gain and a bias (bias = false drops it, as PaLM); computed in fp32, cast back."""

    reference = staticmethod(reference.layer_norm)

    def __init__(self, dim: int, cfg=None, eps: float = 1e-5, bias: bool = True):
        super().__init__(dim, eps=eps, bias=bias)

    def forward(self, x):
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), bias, self.eps).type_as(x)


@hookimpl
def minsota_register_norms():
    return {"rmsnorm": RMSNorm, "rmsnorm-noparam": rmsnorm_noparam, "layernorm": LayerNorm}
