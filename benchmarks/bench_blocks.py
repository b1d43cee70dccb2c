"""Blocks: every registered block topology, as the recipe builds it, against its plain reference.

Each block of the registry (with sota-2024's components: RMSNorm, RoPE, SDPA, SwiGLU) runs forward+backward
on the TensorDict state, eager and compiled (fullgraph), and is compared with `minsota.reference`'s plain-
tensor version of the same block on the same weights: speed-up over the (eager) reference and parity of the
output and of every gradient.

A layered recipe (`test_layered_stack`) runs its blocks in sequence the same way: layers that differ
(window, RoPE θ) compiled as one graph.

Sizes: CPU fp32 dim 384, 6 heads / 2 KV, batch 8 x 256; CUDA bf16 sota-2024's dim 768, 12 / 4 heads,
batch 16 x 1024; --smoke: dim 64, 4 / 2 heads, batch 2 x 32.
"""

import pytest
import torch

from minsota import load_plugins, reference
from minsota.loader import load_recipe
from minsota.model import build_model
from minsota.state import HIDDEN, make_state

from harness import TOLERANCE, interleaved, parity, speed, worst

SIZES = {  # recipe overrides and the batch
    "smoke": dict(shape={"model.dim": 64, "model.n_heads": 4, "model.n_kv_heads": 2}, batch=2, seq_len=32),
    "cpu": dict(shape={"model.dim": 384, "model.n_heads": 6, "model.n_kv_heads": 2}, batch=8, seq_len=256),
    "cuda": dict(shape={}, batch=16, seq_len=1024),
}


@pytest.mark.parametrize("mode", ["eager", "compile"])
@pytest.mark.parametrize("name", load_plugins().registry("block").list())
def test_block(benchmark, record, setting, name, mode):
    size = SIZES[setting.size_key]
    T = size["seq_len"]
    recipe = load_recipe(
        "sota-2024", {**size["shape"], "model.n_layers": 1, "model.max_seq_len": T, "model.block": name}
    )
    torch.manual_seed(0)
    block = build_model(recipe, setting.device).layers[0]
    if reference.of(block) is None:
        pytest.skip(f"{type(block).__name__} has no reference")
    hidden = torch.randn(size["batch"], T, recipe.model.dim, device=setting.device, requires_grad=True)
    positions = torch.arange(T, device=setting.device).expand(size["batch"], T)
    leaves = dict(block.named_parameters(), hidden=hidden)

    def forward(h, p):
        return block(make_state(h, p))[HIDDEN]

    def reference_forward(h, p):
        return reference.call(block, h, p)

    if mode == "compile":
        forward = torch.compile(forward, fullgraph=True)
    cotangent = torch.randn_like(hidden)

    def fwd_bwd(fn, autocast=True):
        def step():
            with setting.autocast() if autocast else torch.autocast(setting.device.type, enabled=False):
                y = fn(hidden, positions)
            return y, torch.autograd.grad(y, list(leaves.values()), cotangent.to(y.dtype))

        return step

    actual, grads = fwd_bwd(forward)()
    expected, expected_grads = fwd_bwd(reference_forward, autocast=False)()  # the fp32 truth
    tolerance = TOLERANCE[setting.dtype]
    figures = worst(
        parity(actual, expected.to(actual.dtype), tolerance, f"block {name} ({mode}) output"),
        *(
            parity(a, e, tolerance, f"block {name} ({mode}) gradient of {leaf}")
            for leaf, a, e in zip(leaves, grads, expected_grads)
        ),
    )
    timing = interleaved(benchmark, setting, fwd_bwd(forward), {"reference": fwd_bwd(reference_forward)})
    record(**figures, **speed(timing, "reference"))


@pytest.mark.parametrize("mode", ["eager", "compile"])
@pytest.mark.parametrize("layout", ["sota-2024-local-global"])
def test_layered_stack(benchmark, record, setting, layout, mode):
    """A layered recipe's blocks in sequence (sota-2024-local-global: local, local, global; a window of T/4 and
    a θ per type), as the decoder runs them, against the same stack of references; compiled, a second step must
    not recompile."""
    size = SIZES[setting.size_key]
    T = size["seq_len"]
    recipe = load_recipe(
        layout,
        {
            **size["shape"],
            "model.n_layers": 3,
            "model.max_seq_len": T,
            "model.layer_types.local.attention.window": T // 4,
        },
    )
    torch.manual_seed(0)
    layers = build_model(recipe, setting.device).layers
    hidden = torch.randn(size["batch"], T, recipe.model.dim, device=setting.device, requires_grad=True)
    positions = torch.arange(T, device=setting.device).expand(size["batch"], T)
    leaves = dict(layers.named_parameters(), hidden=hidden)

    def forward(h, p):
        state = make_state(h, p)
        for layer in layers:
            state = layer(state)
        return state[HIDDEN]

    def reference_forward(h, p):
        for layer in layers:
            h = reference.call(layer, h, p)
        return h

    if mode == "compile":
        forward = torch.compile(forward, fullgraph=True)
    cotangent = torch.randn_like(hidden)

    def fwd_bwd(fn, autocast=True):
        def step():
            with setting.autocast() if autocast else torch.autocast(setting.device.type, enabled=False):
                y = fn(hidden, positions)
            return y, torch.autograd.grad(y, list(leaves.values()), cotangent.to(y.dtype))

        return step

    actual, grads = fwd_bwd(forward)()
    expected, expected_grads = fwd_bwd(reference_forward, autocast=False)()
    tolerance = TOLERANCE[setting.dtype]
    figures = worst(
        parity(actual, expected.to(actual.dtype), tolerance, f"layered stack ({mode}) output"),
        *(
            parity(a, e, tolerance, f"layered stack ({mode}) gradient of {leaf}")
            for leaf, a, e in zip(leaves, grads, expected_grads)
        ),
    )
    timing = interleaved(benchmark, setting, fwd_bwd(forward), {"reference": fwd_bwd(reference_forward)})
    with torch._dynamo.config.patch(error_on_recompile=True):  # the layout is static: no guard fails later
        fwd_bwd(forward)()
    record(**figures, **speed(timing, "reference"))
