"""Built-in block topologies. Each receives its norm factory, attention and feed-forward already built.

prenorm   h = x + attn(norm(x));        y = h + ff(norm(h))         GPT-2 onwards, Llama, Mistral
postnorm  h = norm(x + attn(x));        y = norm(h + ff(h))         Vaswani et al. 2017 (set model.final_norm = false)
parallel  y = x + attn(norm(x)) + ff(norm(x))                       GPT-J, PaLM: one norm, both branches summed
sandwich  h = x + norm(attn(norm(x)));  y = h + norm(ff(norm(h)))   Gemma 2 (CogView's sandwich-LN,
                                                                    https://arxiv.org/abs/2105.13290)
  pre = false: h = x + norm(attn(x));   y = h + norm(ff(h))         OLMo 2's reordered norm
"""

from torch import nn

from minsota import hookimpl, reference
from minsota.state import HIDDEN, read


class SequentialBlock(nn.Module):
    """Attention then feed-forward, each with one norm; subclasses place the norms."""

    def __init__(self, cfg, *, norm, attention, feedforward):
        super().__init__()
        self.attention_norm, self.attention = norm(), attention
        self.ffn_norm, self.feed_forward = norm(), feedforward


class PreNormBlock(SequentialBlock):
    """Sequential pre-norm block (Llama/Mistral)."""

    reference = staticmethod(reference.prenorm)

    def forward(self, state):
        x, positions, document_ids = read(state)
        h = x + self.attention(self.attention_norm(x), positions, document_ids)
        state[HIDDEN] = h + self.feed_forward(self.ffn_norm(h))
        return state


class PostNormBlock(SequentialBlock):
    """Sequential post-norm block (the original Transformer); set model.final_norm = false with it."""

    reference = staticmethod(reference.postnorm)

    def forward(self, state):
        x, positions, document_ids = read(state)
        h = self.attention_norm(x + self.attention(x, positions, document_ids))
        state[HIDDEN] = self.ffn_norm(h + self.feed_forward(h))
        return state


class ParallelBlock(nn.Module):
    """Parallel block (GPT-J/PaLM): attention and feed-forward read one norm and are summed."""

    reference = staticmethod(reference.parallel)

    def __init__(self, cfg, *, norm, attention, feedforward):
        super().__init__()
        self.attention_norm, self.attention, self.feed_forward = norm(), attention, feedforward

    def forward(self, state):
        x, positions, document_ids = read(state)
        h = self.attention_norm(x)
        state[HIDDEN] = x + self.attention(h, positions, document_ids) + self.feed_forward(h)
        return state


class SandwichBlock(nn.Module):
    """Norms before and after each sublayer (Gemma 2); pre = false keeps only the after-norms (OLMo 2)."""

    reference = staticmethod(reference.sandwich)

    def __init__(self, cfg, *, norm, attention, feedforward, pre: bool = True):
        super().__init__()
        self.attention_norm = norm() if pre else nn.Identity()
        self.attention, self.attention_out_norm = attention, norm()
        self.ffn_norm = norm() if pre else nn.Identity()
        self.feed_forward, self.ffn_out_norm = feedforward, norm()

    def forward(self, state):
        x, positions, document_ids = read(state)
        h = x + self.attention_out_norm(self.attention(self.attention_norm(x), positions, document_ids))
        state[HIDDEN] = h + self.ffn_out_norm(self.feed_forward(self.ffn_norm(h)))
        return state


@hookimpl
def minsota_register_blocks():
    return {"prenorm": PreNormBlock, "postnorm": PostNormBlock, "parallel": ParallelBlock, "sandwich": SandwichBlock}
