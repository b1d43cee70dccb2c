"""Mixture of experts: the `moe` feed-forward's dispatches against each other and against a dense twin.

`test_moe_feedforward`: sota-2024-moe's feed-forward (8 experts, top-2) forward+backward, grouped-matmul dispatch
(eager / compiled fullgraph) against the per-expert loop dispatch (eager: its sizes are data-dependent) and a dense
SwiGLU of the same active width (top_k · expert_dim, so equal active parameters but the routers), each in the same
mode; parity of the output and every gradient against the module's reference (the per-expert loop over a per-token
routing). `test_mla_block`: one sota-2024-mla block against one sota-2024 (GQA 12/4) block, forward+backward, parity
against the reference block. `test_kv_cache_bytes`: the bytes per token and layer that cached decoding keeps, MLA's
latent + rope key beside GQA's keys and values, at sota-2024 sizes and at DeepSeek-V3's.

Sizes: CPU fp32 dim 384, batch 8 x 256; CUDA bf16 the recipes' own dims, batch 16 x 1024; --smoke: dim 64,
batch 2 x 32.
"""

import pytest
import torch

from minsota import reference
from minsota.loader import load_recipe
from minsota.model import build_model

from harness import TOLERANCE, interleaved, parity, speed, worst

SIZES = {
    "smoke": dict(
        shape={"model.dim": 64, "model.n_heads": 4, "model.n_kv_heads": 2}, expert_dim=64, batch=2, seq_len=32
    ),
    "cpu": dict(
        shape={"model.dim": 384, "model.n_heads": 6, "model.n_kv_heads": 2}, expert_dim=512, batch=8, seq_len=256
    ),
    "cuda": dict(shape={}, expert_dim=1024, batch=16, seq_len=1024),
}


def _fwd_bwd(fn, x, leaves, cotangent, setting, autocast=True):
    def step():
        with setting.autocast() if autocast else torch.autocast(setting.device.type, enabled=False):
            y = fn(x)
        return y, torch.autograd.grad(y, list(leaves.values()), cotangent.to(y.dtype))

    return step


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_moe_feedforward(benchmark, record, setting, mode):
    size = SIZES[setting.size_key]
    overrides = {
        **size["shape"],
        "model.n_layers": 1,
        "model.max_seq_len": size["seq_len"],
        "model.feedforward.expert_dim": size["expert_dim"],
    }
    moe_recipe = load_recipe("sota-2024-moe", overrides)
    torch.manual_seed(0)
    moe = build_model(moe_recipe, setting.device).layers[0].feed_forward
    loop = (
        build_model(load_recipe("sota-2024-moe", {**overrides, "model.feedforward.dispatch": "loop"}), setting.device)
        .layers[0]
        .feed_forward
    )
    loop.load_state_dict(moe.state_dict())
    dense = (
        build_model(
            load_recipe(
                "sota-2024", {**size["shape"], "model.n_layers": 1, "model.ffn_dim": moe.top_k * moe.expert_dim}
            ),
            setting.device,
        )
        .layers[0]
        .feed_forward
    )
    assert moe.dispatch == "grouped" and loop.dispatch == "loop"
    x = torch.randn(size["batch"], size["seq_len"], moe_recipe.model.dim, device=setting.device, requires_grad=True)
    cotangent = torch.randn_like(x)
    grouped_fn, dense_fn = (torch.compile(m, fullgraph=True) if mode == "compile" else m for m in (moe, dense))
    leaves = dict(moe.named_parameters(), x=x)
    actual, grads = _fwd_bwd(grouped_fn, x, leaves, cotangent, setting)()
    expected, expected_grads = _fwd_bwd(lambda h: reference.call(moe, h), x, leaves, cotangent, setting, False)()
    looped, looped_grads = _fwd_bwd(loop, x, dict(loop.named_parameters(), x=x), cotangent, setting, False)()
    tolerance = TOLERANCE[setting.dtype]
    figures = worst(
        parity(actual, expected.to(actual.dtype), tolerance, f"moe ({mode}) output"),
        parity(looped, expected, TOLERANCE[torch.float32], "moe loop output"),
        *(
            parity(a, e, tolerance, f"moe ({mode}) gradient of {leaf}")
            for leaf, a, e in zip(leaves, grads, expected_grads)
        ),
        *(
            parity(a, e, TOLERANCE[torch.float32], f"moe loop gradient of {leaf}")
            for leaf, a, e in zip(leaves, looped_grads, expected_grads)
        ),
    )
    peers = {
        "loop": _fwd_bwd(loop, x, dict(loop.named_parameters(), x=x), cotangent, setting),
        "dense": _fwd_bwd(dense_fn, x, dict(dense.named_parameters(), x=x), cotangent, setting),
    }
    timing = interleaved(benchmark, setting, _fwd_bwd(grouped_fn, x, leaves, cotangent, setting), peers)
    if mode == "compile":  # routing changes every step, shapes do not: no guard fails
        with torch._dynamo.config.patch(error_on_recompile=True):
            other = torch.randn_like(x).requires_grad_()
            _fwd_bwd(grouped_fn, other, dict(moe.named_parameters(), x=other), cotangent, setting)()
    record(**figures, **speed(timing, "loop", "loop"), **({"vs_dense": timing["dense"]} if timing else {}))
