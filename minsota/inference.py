"""Using a trained run: load its newest checkpoint, evaluate it on a chosen source, sample from it with a KV cache.

The KV cache stays out of the training path. An attention module that supports caching declares a class
attribute ``kv_cache = None``; `KVCaches` gives each such module a `KVCache` for the duration of a generation
and its forward appends the new tokens' keys and values, then attends with the new queries over everything
cached (the queries are the last rows of that causal window). Training never sets the attribute, so its
forward and its compiled graph see only a constant ``None`` test. A model whose attention declares no cache
still generates, recomputing the whole window at every token.
"""

import contextlib
import itertools
import math
from pathlib import Path

import torch

from minsota import checkpoint
from minsota.data import build_batches, build_tokenizer
from minsota.errors import UserError
from minsota.model import Decoder, build_model
from minsota.recipe import Recipe, recipe_from_dict


def load_run(path: Path, overrides: dict | None = None, plugins=(), device=None) -> tuple[Recipe, Decoder, int]:
    """(recipe, model in eval mode, step) from a run directory's newest valid checkpoint, or from one named
    checkpoint ``RUN_DIR/checkpoints/step-N``; the recipe is the one that checkpoint was trained with. The
    model is built on ``device``, by default the recipe's ``train.device``."""
    from minsota.train import resolve_device

    path = Path(path)
    if not (path / "recipe.json").is_file() and not checkpoint.STEP_DIR.fullmatch(path.name):
        raise UserError(f"{path}: not a run directory (no recipe.json)")
    run_dir, newest = checkpoint.find_resumable(path)
    if newest is None:
        raise UserError(f"{run_dir}: no checkpoint yet (the trainer writes one every train.checkpoint_every "
                        f"steps and at the end)")
    saved = checkpoint.load(newest, weights_only=True)
    recipe = recipe_from_dict(saved["recipe"], str(newest / checkpoint.RECIPE), overrides, plugins)
    model = build_model(recipe, device or resolve_device(recipe.train.device))
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as e:
        raise UserError(f"{newest}: does not fit this model: {str(e).strip().splitlines()[0]}") from None
    return recipe, model.eval(), saved["step"]


# -------------------------------------------------------------------------------------------- evaluation


def evaluate_run(path: Path, overrides: dict | None = None, plugins=(), batches: int | None = None) -> dict:
    """Validation loss and perplexity of a run's model on its recipe's data (or another ``data.source``);
    bits per byte too when the tokenizer is bytes (a token is a byte, so bits/byte = loss / ln 2)."""
    from minsota.train import autocast_dtype, evaluate

    recipe, model, step = load_run(path, overrides, plugins)
    tokenizer = build_tokenizer(recipe)
    if batches is not None and batches < 1:
        raise UserError(f"--batches must be at least 1, got {batches}")
    n = batches or recipe.train.eval_batches
    val = list(itertools.islice(build_batches(recipe, tokenizer, "validation"), n))
    if not val:
        raise UserError(f"{recipe.where('data.source')}: data.source = '{recipe.data.source}' has no validation data")
    device = model.output.weight.device
    dtype = autocast_dtype(recipe.train.precision, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    loss = evaluate(model, val, autocast, device, recipe.data.packing == "document")
    result = {"step": step, "source": recipe.data.source, "tokens": sum(b["targets"].numel() for b in val),
              "loss": loss, "perplexity": math.exp(loss)}
    if tokenizer.name == "bytes":
        result["bits_per_byte"] = loss / math.log(2)
    return result


def format_evaluation(result: dict) -> str:
    lines = [f"step:        {result['step']}", f"source:      {result['source']} (validation, {result['tokens']:,} tokens)",
             f"loss:        {result['loss']:.4f}", f"perplexity:  {result['perplexity']:.4g}"]
    if "bits_per_byte" in result:
        lines.append(f"bits/byte:   {result['bits_per_byte']:.4f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- sampling


class KVCache:
    """The keys, values and positions one attention layer has seen so far in this generation."""

    def __init__(self):
        self.k = self.v = self.positions = None

    def update(self, k, v, positions):
        """Append the new tokens' k, v (B, KV, T, hd) and positions (B, T); return everything cached."""
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
            positions = torch.cat([self.positions, positions], dim=1)
        self.k, self.v, self.positions = k, v, positions
        return k, v, positions


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


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> int:
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
def generate(model: Decoder, prompt: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stop_id: int | None = None, use_cache: bool = True,
             stop=None) -> list[int]:
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
            tokens = torch.tensor([ids[start + seen:]], device=device)  # (1, T): only what the caches lack
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


def sample_text(path: Path, prompt: str, max_new_tokens: int = 200, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, seed: int = 0, overrides: dict | None = None, plugins=()) -> str:
    """The prompt and what a run's model writes after it, until max_new_tokens or the end of the document."""
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise UserError(f"sampling needs temperature >= 0, top-k >= 0 and 0 < top-p <= 1 "
                        f"(got {temperature}, {top_k}, {top_p})")
    recipe, model, _ = load_run(path, overrides, plugins)
    tokenizer = build_tokenizer(recipe)
    ids = [tokenizer.eos_id, *tokenizer.encode(prompt)]  # after EOS: the start of a document, as in training
    new = generate(model, ids, max_new_tokens, temperature, top_k, top_p, seed, stop_id=tokenizer.eos_id)
    return prompt + tokenizer.decode(new)
