"""Using a trained run: load its newest checkpoint, evaluate it on a chosen source, sample from it.

Above `minsota.generation` (KV cache, sampling) and `minsota.runtime` (device, precision, evaluation), which
the trainer uses too; nothing here is imported by the trainer.
"""

import itertools
import math
from pathlib import Path

from minsota import checkpoint, rundir
from minsota.data import build_batches, build_tokenizer
from minsota.errors import UserError
from minsota.generation import generate
from minsota.loader import recipe_from_dict
from minsota.model import Decoder, build_model
from minsota.recipe import Recipe
from minsota.runtime import autocast_context, autocast_dtype, evaluate, resolve_device


def load_run(path: Path, overrides: dict | None = None, plugin_specs=(), device=None) -> tuple[Recipe, Decoder, int]:
    """(recipe, model in eval mode, step) from a run directory's newest valid checkpoint, or from one named
    checkpoint ``RUN_DIR/checkpoints/step-N``; the recipe is the one that checkpoint was trained with. The
    model is built on ``device``, by default the recipe's ``train.device``."""
    path = Path(path)
    if not (path / "recipe.json").is_file() and not checkpoint.STEP_DIR.fullmatch(path.name):
        raise UserError(f"{path}: not a run directory (no recipe.json)")
    run_dir, newest = rundir.find_resumable(path)
    if newest is None:
        raise UserError(
            f"{run_dir}: no checkpoint yet (the trainer writes one every train.checkpoint_every steps and at the end)"
        )
    saved = checkpoint.load(newest, weights_only=True)
    recipe = recipe_from_dict(saved["recipe"], str(newest / checkpoint.RECIPE), overrides, plugin_specs)
    model = build_model(recipe, device or resolve_device(recipe.train.device))
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as e:
        raise checkpoint.does_not_fit(newest, e) from None
    return recipe, model.eval(), saved["step"]


# -------------------------------------------------------------------------------------------- evaluation


def evaluate_run(path: Path, overrides: dict | None = None, plugin_specs=(), batches: int | None = None) -> dict:
    """Validation loss and perplexity of a run's model on its recipe's data (or another ``data.source``);
    bits per byte too when the tokenizer is bytes (a token is a byte, so bits/byte = loss / ln 2)."""
    recipe, model, step = load_run(path, overrides, plugin_specs)
    tokenizer = build_tokenizer(recipe)
    if batches is not None and batches < 1:
        raise UserError(f"--batches must be at least 1, got {batches}")
    n = batches or recipe.train.eval_batches
    val = list(itertools.islice(build_batches(recipe, tokenizer, "validation"), n))
    if not val:
        raise UserError(f"{recipe.where('data.source')}: data.source = '{recipe.data.source}' has no validation data")
    device = model.output.weight.device
    autocast = autocast_context(device, autocast_dtype(recipe.train.precision, device))
    loss = evaluate(model, val, autocast, device, recipe.data.packing == "document")
    result = {
        "step": step,
        "source": recipe.data.source,
        "tokens": sum(b["targets"].numel() for b in val),
        "loss": loss,
        "perplexity": math.exp(loss),
    }
    if tokenizer.name == "bytes":
        result["bits_per_byte"] = loss / math.log(2)
    return result


def format_evaluation(result: dict) -> str:
    lines = [
        f"step:        {result['step']}",
        f"source:      {result['source']} (validation, {result['tokens']:,} tokens)",
        f"loss:        {result['loss']:.4f}",
        f"perplexity:  {result['perplexity']:.4g}",
    ]
    if "bits_per_byte" in result:
        lines.append(f"bits/byte:   {result['bits_per_byte']:.4f}")
    return "\n".join(lines)


def sample_text(
    path: Path,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    overrides: dict | None = None,
    plugin_specs=(),
) -> str:
    """The prompt and what a run's model writes after it, until max_new_tokens or the end of the document."""
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise UserError(
            f"sampling needs temperature >= 0, top-k >= 0 and 0 < top-p <= 1 (got {temperature}, {top_k}, {top_p})"
        )
    recipe, model, _ = load_run(path, overrides, plugin_specs)
    tokenizer = build_tokenizer(recipe)
    ids = [tokenizer.eos_id, *tokenizer.encode(prompt)]  # after EOS: the start of a document, as in training
    new = generate(model, ids, max_new_tokens, temperature, top_k, top_p, seed, stop_id=tokenizer.eos_id)
    return prompt + tokenizer.decode(new)


def evaluate_run_tasks(
    path: Path,
    tasks: list[str],
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    include_path: str | None = None,
    overrides: dict | None = None,
    plugin_specs=(),
) -> str:
    """``minsota eval RUN_DIR --tasks ...``: lm-evaluation-harness tasks (`minsota.harness`, the optional [eval]
    extra, imported only here) on a run's newest checkpoint or RUN_DIR/checkpoints/step-N; task names are checked
    before the model is loaded."""
    from minsota.harness import report_run, task_manager, task_names

    manager = task_manager(include_path, tasks=tasks)
    names = task_names(manager, tasks)
    recipe, model, step = load_run(path, overrides, plugin_specs)
    path = Path(path)
    run_dir = path.parent.parent if checkpoint.STEP_DIR.fullmatch(path.name) else path
    return report_run(recipe, model, step, run_dir, names, manager, num_fewshot, limit, batch_size)
