"""Built-in block topologies. Each receives its norm factory, attention and feed-forward already built.

prenorm:  h = x + attn(norm(x)); y = h + ff(norm(h))       (GPT-2 onwards, Llama, Mistral)
parallel: y = x + attn(norm(x)) + ff(norm(x))             (GPT-J, PaLM: one norm, both branches summed)
"""

from torch import nn

from minsota import hookimpl
from minsota.state import HIDDEN, read


class PreNormBlock(nn.Module):
    """Sequential pre-norm block (Llama/Mistral)."""

    def __init__(self, cfg, *, norm, attention, feedforward):
        super().__init__()
        self.attention_norm, self.attention = norm(), attention
        self.ffn_norm, self.feed_forward = norm(), feedforward

    def forward(self, state):
        x, positions, document_ids = read(state)
        h = x + self.attention(self.attention_norm(x), positions, document_ids)
        state[HIDDEN] = h + self.feed_forward(self.ffn_norm(h))
        return state


class ParallelBlock(nn.Module):
    """Parallel block (GPT-J/PaLM): attention and feed-forward read one norm and are summed."""

    def __init__(self, cfg, *, norm, attention, feedforward):
        super().__init__()
        self.attention_norm, self.attention, self.feed_forward = norm(), attention, feedforward

    def forward(self, state):
        x, positions, document_ids = read(state)
        h = self.attention_norm(x)
        state[HIDDEN] = x + self.attention(h, positions, document_ids) + self.feed_forward(h)
        return state


@hookimpl
def minsota_register_blocks():
    return {"prenorm": PreNormBlock, "parallel": ParallelBlock}
