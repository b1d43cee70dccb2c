"""The `mla` attention beyond the parity suite (tests/test_parity.py) and the cached-decoding test
(tests/test_inference.py): what its cache holds, its refusals, its softmax scale and its FLOPs."""

import math

import pytest
import torch

from minsota import build_model, load_recipe
from minsota.generation import KVCaches


def mla_model(attention="mla", **overrides):
    recipe = load_recipe("tiny", {"model.attention": attention, "model.init_std": 0.1, **overrides})
    torch.manual_seed(0)
    return build_model(recipe).eval()


@torch.no_grad()
def test_the_cache_holds_the_latent_and_the_rope_key_only():
    model = mla_model({"name": "mla", "kv_lora_rank": 24})
    tokens = torch.randint(0, 256, (1, 9))
    with KVCaches(model) as caches:
        model(tokens)
        for module in caches.modules:
            assert module.kv_cache.k.shape == (1, 1, 9, 24)  # the normed latent
            assert module.kv_cache.v.shape == (1, 1, 9, model.cfg.head_dim)  # the shared rotated key
            assert module.cache_numbers_per_token() == 24 + model.cfg.head_dim


def test_refusals_name_the_key_and_both_kernels(cli):
    code, _, err = cli("show", "tiny", "--set", 'model.attention={ name = "mla", window = 8 }')
    assert code == 2 and "model.attention" in err and "'mla'" in err and "sdpa" in err
    code, _, err = cli("show", "tiny", "--set", 'model.attention={ name = "mla", qk_rope_head_dim = 16 }')
    assert code == 2 and "model.head_dim" in err


def test_softmax_scale_from_the_qk_width_and_yarn_mscale():
    model = mla_model({"name": "mla", "qk_nope_head_dim": 64})
    assert model.layers[0].attention.scale == (64 + 32) ** -0.5
    yarn = {
        "name": "rope",
        "scaling": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 16,
        "attention_factor": 1.0,
    }
    model = mla_model({"name": "mla", "qk_nope_head_dim": 64, "mscale_all_dim": 1.0}, **{"model.positional": yarn})
    assert model.layers[0].attention.scale == pytest.approx((64 + 32) ** -0.5 * (0.1 * math.log(40) + 1) ** 2)


def test_flops_count_the_projections_and_the_qk_and_v_widths():
    model = mla_model({"name": "mla", "q_lora_rank": 16, "v_head_dim": 16})
    attention = model.layers[0].attention
    weights = sum(p.numel() for n, p in attention.named_parameters() if n.startswith("w"))
    qk, v, H, T = 64 + 32, 16, 4, 64
    assert attention.flops_per_token(T) == pytest.approx(2 * weights + 2 * H * (qk + v) * (T / 2))


def test_fullgraph_compile_matches_eager_with_documents():
    """A tiny MLA decoder's loss compiles as one graph (document masking included) and matches eager."""
    recipe = load_recipe("tiny", {"model.attention": "mla", "model.n_layers": 2})
    torch.manual_seed(0)
    model = build_model(recipe)
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    documents = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])
    positions = torch.cat([torch.arange(6), torch.arange(10)]).expand(2, 16) * torch.tensor([[1], [0]]) + torch.arange(
        16
    ).expand(2, 16) * torch.tensor([[0], [1]])
    args = (tokens[:, :-1], tokens[:, 1:], positions, documents)
    torch._dynamo.reset()
    compiled = torch.compile(model.losses, fullgraph=True)
    got, want = compiled(*args)["loss"], model.losses(*args)["loss"]
    assert torch.allclose(got, want, rtol=1e-5), (got, want)
    got.backward()
    assert all(p.grad is not None for p in model.parameters())
