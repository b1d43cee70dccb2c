"""The decoder: exact parameter counts, meta-device builds, init, FLOPs, the TensorDict contract, RoPE in
fp32 under bf16 autocast, and a fullgraph compile with zero graph breaks."""

import math

import pytest
import torch

import minsota
from minsota.state import DOCUMENT_IDS, EMBEDDINGS, HIDDEN, POSITIONS


def tiny(**overrides):
    return minsota.build_model(minsota.load_recipe("tiny", overrides))


def test_sota_2024_parameter_count_matches_hand_arithmetic():
    recipe = minsota.load_recipe("sota-2024")
    m = recipe.model
    hidden = 256 * math.ceil(8 / 3 * m.dim / 256)  # SwiGLU 8/3·dim rounded up to 256 -> 2048
    per_layer = (
        m.dim * (m.n_heads + 2 * m.n_kv_heads) * m.head_dim  # wq, wk, wv (GQA: 4 KV heads)
        + m.n_heads * m.head_dim * m.dim  # wo
        + 3 * m.dim * hidden  # w1, w3, w2
        + 2 * m.dim
    )  # two RMSNorm gains
    expected = 2 * m.vocab_size * m.dim + m.n_layers * per_layer + m.dim  # untied embed + head, final norm
    assert expected == 152_783_616
    model = minsota.build_model(recipe, device="meta")
    assert model.num_parameters() == expected
    assert all(p.is_meta for p in model.parameters())  # nothing allocated


def test_tied_embeddings_share_one_matrix():
    untied, tied = tiny(), tiny(**{"model.tie_embeddings": True})
    assert tied.output.weight is tied.tok_embeddings.weight
    assert untied.num_parameters() - tied.num_parameters() == 256 * 128


def test_init_scales_residual_outputs():
    torch.manual_seed(0)
    model = minsota.build_model(minsota.load_recipe("tiny", {"model.dim": 512, "model.n_heads": 8}))
    std = lambda p: p.detach().std().item()  # noqa: E731
    assert std(model.layers[0].attention.wqkv.weight) == pytest.approx(0.02, rel=0.05)
    assert std(model.layers[0].attention.wo.weight) == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.05)
    assert std(model.layers[0].feed_forward.w2.weight) == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.05)
    assert torch.equal(model.norm.weight, torch.ones(512))


def test_flops_per_token_counts_gqa_projections_and_causal_attention():
    model = tiny()
    cfg, T = model.cfg, 64
    linear = (cfg.dim * (4 + 2 * 2) * 32 + 4 * 32 * cfg.dim + 3 * cfg.dim * 384) * cfg.n_layers + cfg.dim * 256
    attention = 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T
    assert model.flops_per_token(T, training=False) == 2 * linear + attention
    assert model.flops_per_token(T) == 3 * (2 * linear + attention)
    # a sliding window of T/4: each query sees min(i, 16) keys, 14 on average (vs 32 causal)
    windowed = tiny(**{"model.attention": {"name": "sdpa", "window": T // 4}})
    visible = sum(min(i, T // 4) for i in range(1, T + 1)) / T
    assert visible == pytest.approx(14, abs=0.3)
    assert windowed.flops_per_token(T, training=False) == pytest.approx(2 * linear + attention * 14 / 32, rel=1e-9)


def test_decoder_maps_tokens_to_logits_and_blocks_keep_the_key_set():
    model = tiny()
    tokens = torch.randint(0, 256, (2, 16))
    assert model(tokens).shape == (2, 16, 256) and model(tokens).dtype == torch.float32
    from minsota.state import make_state

    state = make_state(torch.randn(2, 16, 128), torch.arange(16).expand(2, 16), torch.zeros(2, 16, dtype=torch.long))
    out = model.layers[0](state)
    assert set(out.keys()) == {HIDDEN, EMBEDDINGS, POSITIONS, DOCUMENT_IDS} and out.batch_size == torch.Size([2, 16])


def test_positions_drive_rope_and_document_ids_mask_attention():
    torch.manual_seed(0)
    model = tiny()
    tokens = torch.randint(1, 256, (1, 12))
    restart = torch.cat([torch.arange(5), torch.arange(7)])[None]
    docs = torch.tensor([[0] * 5 + [1] * 7])
    # the second document alone == the second document packed after the first (masked, positions restarted)
    alone = model(tokens[:, 5:])
    packed = model(tokens, restart, docs)[:, 5:]
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(tokens)[:, 5:], alone, atol=1e-3)  # plain causal: it does see document 0


def test_rope_angles_stay_fp32_under_bf16_autocast():
    # rotary-embedding-torch would build positions in bf16: 2047 and 2046 collapse to one value there
    rope = minsota.load_plugins().registry("positional").get("rope")(minsota.load_recipe("tiny").model)
    q = torch.randn(1, 4, 2048, 32)
    positions = torch.arange(2048)[None]
    reference, _ = rope.rotate(q, q[:, :2], positions)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rotated, _ = rope.rotate(q, q[:, :2], positions)
    assert torch.tensor(2047.0).bfloat16() == torch.tensor(2046.0).bfloat16()  # what the library would suffer
    torch.testing.assert_close(rotated, reference, rtol=0, atol=1e-5)


def test_decoder_compiles_fullgraph_with_zero_graph_breaks():
    torch._dynamo.reset()
    model = tiny(**{"model.n_layers": 2})
    tokens = torch.randint(0, 256, (2, 32))
    explanation = torch._dynamo.explain(model)(tokens)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(tokens), model(tokens), rtol=1e-4, atol=1e-4)
