"""The optimizer step alone, for every registered optimizer, at the train step's shapes (`bench_train_step`'s
sota-2024 sizes), timed against AdamW in the same rounds: Newton–Schulz's cost beside AdamW's fused kernel.

Gradients are random and fixed; each case builds its optimizer through `minsota.optim.build_optimizer` with the
recipe's parameter groups, so Muon orthogonalises q, k, v and gate, up each on its own, as in training. Parity:
one step of each moves the parameters by a finite amount (a broken step would leave NaN or nothing).
"""

import pytest
import torch
from bench_train_step import SIZES

from minsota.loader import load_recipe
from minsota.model import build_model
from minsota.optim import build_optimizer
from minsota.plugins import load_plugins

from harness import interleaved, speed

OPTIONS = {"schedulefree-adamw": {"train.schedule": "constant"}}  # what each needs beside its name


def stepper(name: str, setting):
    """A model with fixed random gradients and ``step()`` of the optimizer ``name`` over it."""
    recipe = load_recipe("sota-2024", {**SIZES[setting.size_key], "train.optimizer": name, **OPTIONS.get(name, {})})
    torch.manual_seed(0)
    model = build_model(recipe, setting.device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = build_optimizer(model, recipe.train)
    if callable(getattr(optimizer, "train", None)):
        optimizer.train()
    return model, optimizer


@pytest.mark.parametrize("name", load_plugins().registry("optimizer").list())
def test_optimizer_step(benchmark, record, setting, name):
    model, optimizer = stepper(name, setting)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    moved = sum((p.detach() - b).abs().sum().item() for p, b in zip(model.parameters(), before))
    assert 0 < moved < float("inf"), f"{name}: one step moved the parameters by {moved}"
    _, adamw = stepper("adamw", setting)
    timing = interleaved(benchmark, setting, optimizer.step, {"adamw": adamw.step})
    record(**speed(timing, "adamw"), parameters=sum(p.numel() for p in model.parameters()))
