"""The optimizer step alone, for every registered optimizer, at the train step's shapes (`bench_train_step`'s
sota-2024 sizes), timed against AdamW in the same rounds: Newton–Schulz's cost beside AdamW's fused kernel.

Gradients are random and fixed; each case builds its optimizer through `minsota.optim.build_optimizer` with the
recipe's parameter groups, so Muon orthogonalises q, k, v and gate, up each on its own, as in training. Parity:
one step of each moves the parameters by a finite amount (a broken step would leave NaN or nothing). The table's
ms is the step's median; speed-up is AdamW's time over it, in the same rounds (< 1: slower than AdamW).

    pytest benchmarks/bench_optimizers.py            # CPU: ~25M parameters (d384, 6 layers, vocab 32000)
    pytest benchmarks/bench_optimizers.py --smoke    # tiny sizes, one round: a check that it runs, not a figure
"""

import pytest
import torch
from bench_train_step import SIZES

from minsota.loader import load_recipe
from minsota.model import build_model
from minsota.optim import build_optimizer, train_mode
from minsota.plugins import load_plugins

from harness import interleaved, speed

OPTIONS = {"schedulefree-adamw": {"train.schedule": "constant"}}  # what each needs beside its name
# each registered optimizer, and Muon's Newton-Schulz in fp32 too (bf16 GEMMs are emulated on CPUs without them)
CASES = {
    **{
        name: {"train.optimizer": name, **OPTIONS.get(name, {})} for name in load_plugins().registry("optimizer").list()
    },
    "muon-ns-fp32": {"train.optimizer": {"name": "muon", "ns_dtype": "float32"}},
}


def stepper(overrides: dict, setting):
    """A model with fixed random gradients and ``step()`` of the optimizer the recipe ``overrides`` name."""
    recipe = load_recipe("sota-2024", {**SIZES[setting.size_key], **overrides})
    torch.manual_seed(0)
    model = build_model(recipe, setting.device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = build_optimizer(model, recipe.train)
    train_mode(optimizer)
    return model, optimizer


@pytest.mark.parametrize("case", CASES)
def test_optimizer_step(benchmark, record, setting, case):
    model, optimizer = stepper(CASES[case], setting)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    moved = sum((p.detach() - b).abs().sum().item() for p, b in zip(model.parameters(), before))
    assert 0 < moved < float("inf"), f"{case}: one step moved the parameters by {moved}"
    _, adamw = stepper(CASES["adamw"], setting)
    timing = interleaved(benchmark, setting, optimizer.step, {"adamw": adamw.step})
    record(**speed(timing, "adamw"), parameters=sum(p.numel() for p in model.parameters()))
