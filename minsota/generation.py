"""Generation: a KV cache per attention layer for the duration of a generation, sampling, `generate`.

The KV cache stays out of the training path. An attention module that supports caching declares a class
attribute ``kv_cache = None`` (`minsota.components.Attention` does); `KVCaches` gives each such module a
`KVCache` for the duration of a generation and its forward appends the new tokens' keys and values, then
attends with the new queries over everything cached (the queries are the last rows of that causal window).
Training never sets the attribute, so its forward and its compiled graph see only a constant ``None`` test.
A model whose attention declares no cache still generates, recomputing the whole window at every token.
Kept apart from the trainer and from `minsota.inference` as gpt-fast keeps its ``generate.py``.
"""

import torch

from minsota.components import KVCache
from minsota.model import Decoder


class KVCaches:
    """A fresh `KVCache` in every attention module that declares ``kv_cache`` while the context is open
    (in none when not ``enabled``)."""

    def __init__(self, model: torch.nn.Module, enabled: bool = True):
        self.modules = [m for m in model.modules() if hasattr(m, "kv_cache")] if enabled else []

    def reset(self):
        for module in self.modules:
            module.kv_cache = KVCache()

    def __enter__(self):
        self.reset()
        return self

    def __exit__(self, *exc):
        for module in self.modules:
            module.kv_cache = None


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> int:
    """A token id from (vocab,) logits: the argmax at temperature 0; otherwise a draw from softmax(logits / T)
    kept to the ``top_k`` likeliest tokens (0: all) and to the smallest set whose probability reaches ``top_p``
    (nucleus sampling, Holtzman et al. 2019, https://arxiv.org/abs/1904.09751)."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        probs, order = logits.softmax(-1).sort(descending=True)
        beyond = probs.cumsum(-1) - probs >= top_p  # the set reached top_p before these (the likeliest always stays)
        logits[order[beyond]] = float("-inf")
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@torch.no_grad()
def generate(
    model: Decoder,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_id: int | None = None,
    use_cache: bool = True,
    stop=None,
) -> list[int]:
    """Up to ``max_new_tokens`` ids sampled after ``prompt`` (not empty), stopping before ``stop_id``, or after
    the token for which ``stop(new_ids)`` is true (a stop string, say).

    The model reads a window of at most ``max_seq_len`` tokens with positions from 0; when the window is full
    it restarts from its newest half, as nanoGPT crops its context.
    """
    window, device = model.cfg.max_seq_len, model.output.weight.device
    generator = torch.Generator(device).manual_seed(seed)
    ids, new = list(prompt), []
    with KVCaches(model, enabled=use_cache) as caches:
        start, seen = max(0, len(ids) - window), 0  # the window is ids[start:]; ids[start:start + seen] are cached
        while len(new) < max_new_tokens:
            if len(ids) - start > window:  # the window is full: restart it from its newest half
                start, seen = len(ids) - window // 2, 0
                caches.reset()
            tokens = torch.tensor([ids[start + seen :]], device=device)  # (1, T): only what the caches lack
            positions = torch.arange(seen, len(ids) - start, device=device)[None]
            logits = model(tokens, positions)[0, -1]
            seen = len(ids) - start if caches.modules else 0
            next_id = sample_next(logits, temperature, top_k, top_p, generator)
            if next_id == stop_id:
                break
            ids.append(next_id)
            new.append(next_id)
            if stop is not None and stop(new):
                break
    return new
