"""Latent attention: the `mla` block against GQA, and the KV cache each keeps per token.

`test_mla_block`: one sota-2024-mla block against one sota-2024 (GQA 12/4) block, forward+backward, eager / compiled
(fullgraph), parity against the reference block. `test_kv_cache_bytes`: the bytes per token and layer that cached
decoding keeps (bf16), MLA's latent + rope key beside GQA's keys and values at sota-2024's size, and beside the
full per-head keys and values at DeepSeek-V3's. Sizes as `bench_moe.py`.
"""

import pytest
import torch

from minsota import reference
from minsota.loader import load_recipe
from minsota.model import build_model
from minsota.state import HIDDEN, make_state

from bench_moe import SIZES, _fwd_bwd
from harness import TOLERANCE, interleaved, parity, speed, worst


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_mla_block(benchmark, record, setting, mode):
    size = SIZES[setting.size_key]
    T = size["seq_len"]
    shape = {**size["shape"], "model.n_layers": 1, "model.max_seq_len": T}
    mla_shape = {**shape, "model.head_dim": shape.get("model.dim", 768) // (2 * shape.get("model.n_heads", 12))}
    torch.manual_seed(0)
    mla = build_model(load_recipe("sota-2024-mla", mla_shape), setting.device).layers[0]
    gqa = build_model(load_recipe("sota-2024", shape), setting.device).layers[0]
    x = torch.randn(size["batch"], T, mla.attention.wo.out_features, device=setting.device, requires_grad=True)
    positions = torch.arange(T, device=setting.device).expand(size["batch"], T)
    cotangent = torch.randn_like(x)

    def as_fn(block):
        fn = lambda h: block(make_state(h, positions))[HIDDEN]  # noqa: E731
        return torch.compile(fn, fullgraph=True) if mode == "compile" else fn

    leaves = dict(mla.named_parameters(), x=x)
    actual, grads = _fwd_bwd(as_fn(mla), x, leaves, cotangent, setting)()
    expected, expected_grads = _fwd_bwd(
        lambda h: reference.call(mla, h, positions), x, leaves, cotangent, setting, False
    )()
    tolerance = TOLERANCE[setting.dtype]
    figures = worst(
        parity(actual, expected.to(actual.dtype), tolerance, f"mla block ({mode}) output"),
        *(
            parity(a, e, tolerance, f"mla block ({mode}) gradient of {leaf}")
            for leaf, a, e in zip(leaves, grads, expected_grads)
        ),
    )
    timing = interleaved(
        benchmark,
        setting,
        _fwd_bwd(as_fn(mla), x, leaves, cotangent, setting),
        {"gqa": _fwd_bwd(as_fn(gqa), x, dict(gqa.named_parameters(), x=x), cotangent, setting)},
    )
    record(**figures, **speed(timing, "gqa", "GQA block"))


@pytest.mark.parametrize("recipe_name, gqa_name", [("sota-2024-mla", "sota-2024"), ("deepseek-v3", None)])
def test_kv_cache_bytes(benchmark, record, setting, recipe_name, gqa_name):
    """Bytes per token and layer in the cache at the recipe's own size (bf16 numbers): MLA's latent and rope key
    against GQA's keys and values (sota-2024), or against the full per-head K and V MLA would otherwise keep."""
    attention = build_model(load_recipe(recipe_name), device="meta").layers[-1].attention
    mla = attention.cache_numbers_per_token() * 2
    if gqa_name:
        cfg = load_recipe(gqa_name).model
        full = 2 * cfg.n_kv_heads * cfg.head_dim * 2
    else:  # the keys (nope + rope) and values of every head
        full = attention.n_heads * (attention.nope + attention.rope + attention.v_dim) * 2
    benchmark.pedantic(attention.cache_numbers_per_token, rounds=1)
    assert mla < full
    record(mla_bytes=mla, other_bytes=full, cache_ratio=full / mla)
