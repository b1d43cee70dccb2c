"""Optimization: the parameter groups every optimizer receives, the optimizer and the learning-rate schedule
(both registry plugins: `minsota list optimizers` / `schedules`), the warmup they share, the optimizer's
train/eval seam and the loss scaler. The trainer builds from here and `benchmarks/` times the same objects.

Parameter groups carry a ``role`` (``matrix``: 2-D weights inside the layers; ``embedding``: token/position
embeddings, a tied LM head included; ``head``: an untied LM head; ``vector``: gains, biases, scalars), the
``names`` of their tensors as in ``model.named_parameters()``, ``lr`` (``train.lr`` × ``lr_scale``),
``lr_scale`` and ``weight_decay`` (matrices and the head; embeddings only with ``train.decay_embeddings``;
never norms, gains or biases: GPT-3, Llama), and ``splits``: per tensor, the rows of each logical matrix a
fused weight holds (a module's ``param_splits``), or None. ``[[train.param_groups]]`` rules (fnmatch globs
over names, the first match wins) set ``lr_scale`` and ``weight_decay`` per tensor; one group per (role, rule).

Each step sets every group's lr to its ``initial_lr`` × the multiplier: the warmup ramp (linear, cosine or
none), then the schedule's value, so groups keep their ratios. An optimizer may have ``train()`` and
``eval()`` (schedule-free's averaged weights): the trainer calls ``train()`` before stepping and
``eval()``/``train()`` around evaluation, checkpoints and sampling (`eval_mode`).
"""

import contextlib
import fnmatch
import math

import torch
from torch import nn

from minsota.errors import UserError
from minsota.plugins import load_plugins
from minsota.recipe import TrainConfig, component, param_group

ROLES = ("matrix", "embedding", "head", "vector")


def parameter_roles(model: nn.Module) -> dict[str, str]:
    """Each parameter's name (as ``named_parameters()`` gives it: tied tensors once) -> its role."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(getattr(model, "output", None), "weight", None)
    roles = {}
    for name, p in model.named_parameters():
        if id(p) in embeddings:
            roles[name] = "embedding"
        elif p is head:
            roles[name] = "head"
        else:
            roles[name] = "matrix" if p.ndim >= 2 else "vector"
    return roles


def _splits(model: nn.Module) -> dict[str, list[int]]:
    """Parameter name -> the rows of each logical matrix it fuses, from modules' ``param_splits``."""
    found = {}
    for prefix, module in model.named_modules():
        for local, sizes in getattr(module, "param_splits", {}).items():
            found[f"{prefix}.{local}" if prefix else local] = list(sizes)
    return found


def param_groups(model: nn.Module, t: TrainConfig) -> list[dict]:
    """The role-tagged groups (see the module docstring), ``[[train.param_groups]]`` applied."""
    rules, matched = t.param_groups, set()
    splits, groups = _splits(model), {}
    params = dict(model.named_parameters())
    for name, role in sorted(parameter_roles(model).items(), key=lambda item: ROLES.index(item[1])):
        decays = role in ("matrix", "head") or (role == "embedding" and t.decay_embeddings)
        rule = next((i for i, r in enumerate(rules) if any(fnmatch.fnmatchcase(name, g) for g in r["params"])), None)
        lr_scale, weight_decay = 1.0, t.weight_decay if decays else 0.0
        if rule is not None:
            matched.update(g for g in rules[rule]["params"] if fnmatch.fnmatchcase(name, g))
            lr_scale = float(rules[rule].get("lr_scale", lr_scale))
            weight_decay = float(rules[rule].get("weight_decay", weight_decay))
        group = groups.setdefault(
            (role, rule, weight_decay), param_group(role, t.lr * lr_scale, lr_scale, weight_decay)
        )
        group["params"].append(params[name])
        group["names"].append(name)
        group["splits"].append(splits.get(name))
    for i, rule in enumerate(rules):
        for glob in rule["params"]:
            if glob not in matched:
                raise UserError(
                    f"train.param_groups[{i}]: params glob {glob!r} matches no parameter of this model "
                    f"(see `minsota show`)"
                )
    return list(groups.values())


def build_optimizer(model: nn.Module, t: TrainConfig, plugin_specs=()) -> torch.optim.Optimizer:
    """``train.optimizer`` (a registered name, or an inline table with its options) over `param_groups`."""
    return optimizer_over(param_groups(model, t), t, plugin_specs)


def optimizer_over(groups: list[dict], t: TrainConfig, plugin_specs=()) -> torch.optim.Optimizer:
    """``train.optimizer`` over ``groups`` (a model's, or `minsota.recipe.stand_in_groups`)."""
    name, options = component(t.optimizer)
    factory = load_plugins(plugin_specs).registry("optimizer").get(name)
    try:
        optimizer = factory(groups, t, **options)
    except (TypeError, ValueError) as e:
        raise UserError(f"train.optimizer: {name}: {e}") from None
    for group in optimizer.param_groups:  # what the schedule multiplies (torch's LRScheduler keeps it there too)
        group["initial_lr"] = group["lr"]
    return optimizer


def describe_groups(optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's groups as table rows (`minsota show`): role, tensors, parameters, lr, weight decay, first
    tensor's name, and the algorithm where one optimizer runs several."""
    rows = [("role", "tensors", "parameters", "lr", "weight_decay", "first")]
    for g in optimizer.param_groups:
        rows.append(
            (
                g.get("role", "?"),
                str(len(g["params"])),
                f"{sum(p.numel() for p in g['params']):,}",
                f"{g['initial_lr']:.1e}",
                f"{g['weight_decay']:g}",
                g.get("names", ["?"])[0],
                *([g["algorithm"]] if "algorithm" in g else []),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    return [
        ("  ".join(f"{c:<{w}}" for c, w in zip(row, widths)) + "".join(f"  {c}" for c in row[6:])).rstrip()
        for row in rows
    ]


def build_schedule(t: TrainConfig, plugin_specs=()):
    """``train.schedule``'s ``multiplier(step) -> float`` (the recipe was validated: it builds)."""
    name, options = component(t.schedule)
    return load_plugins(plugin_specs).registry("schedule").get(name)(t, **options)


def lr_multiplier(step: int, t: TrainConfig, schedule) -> float:
    """What optimizer step ``step`` (0-based) multiplies each group's base lr by: warmup, then the schedule."""
    warmup = t.warmup_count()
    if step < warmup:
        ramp = (step + 1) / (warmup + 1)  # never 0: the first step already learns (nanoGPT)
        return ramp if t.warmup_shape == "linear" else 0.5 * (1 - math.cos(math.pi * ramp))
    return schedule(step)


def train_mode(optimizer) -> None:
    """Put an optimizer that has modes (``train()``/``eval()``, e.g. schedule-free) in its training mode."""
    if callable(getattr(optimizer, "train", None)):
        optimizer.train()


@contextlib.contextmanager
def eval_mode(optimizer):
    """The optimizer's evaluation mode (schedule-free: the averaged weights) while evaluating, checkpointing or
    sampling; back to training mode after. Optimizers without modes are untouched."""
    if callable(getattr(optimizer, "eval", None)):
        optimizer.eval()
    try:
        yield
    finally:
        train_mode(optimizer)


def build_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """fp16's dynamic loss scaler; a no-op for every other precision."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
