"""The seams of issue 13, proven by example plugins written against the public surface only (tests/plugins/layers/):
ResFormer's value residual (state written by one block, read by later ones; `layer=`), modded-nanogpt's x0
mixing (the state's `embeddings`), a depth-scaled init (`layer=` and `init_weights`) and an auxiliary loss
(logged, differentiated; equal over 1 and 2 ranks under DDP and FSDP2 in tests/test_moe.py)."""

import math

import pytest
import torch

import minsota
from minsota.generation import generate

from conftest import PLUGINS, records, sets

LAYERS = PLUGINS / "layers"
VALUE_RESIDUAL = {"model.block": "value-residual", "model.attention": "value-residual"}
PENALTY = {"model.feedforward": {"name": "activation-penalty", "coefficient": 0.01}}
PENALTY_SET = {"model.feedforward": '{name="activation-penalty", coefficient=0.01}'}  # as typed after --set
EXAMPLES = {
    "value_residual.py": VALUE_RESIDUAL,
    "x0_mixing.py": {"model.block": "x0-prenorm"},
    "depth_init.py": {"model.feedforward": "depth-swiglu"},
    "activation_penalty.py": PENALTY_SET,
}
SHORT = {"train.steps": 3, "train.eval_batches": 1}


def model_with(plugin: str, overrides: dict, **more):
    recipe = minsota.load_recipe("tiny", {**overrides, **more}, plugin_specs=[str(LAYERS / plugin)])
    torch.manual_seed(0)
    return minsota.build_model(recipe)


@pytest.mark.parametrize("plugin", EXAMPLES)
def test_each_example_trains_from_the_command_line(cli, tmp_path, plugin):
    code, _, err = cli(
        "train", "tiny", "--plugin", LAYERS / plugin, *sets({**EXAMPLES[plugin], **SHORT}), "--out", tmp_path / "run"
    )  # the end-of-run sample decodes with the KV cache
    assert code == 0, err
    steps = [r for r in records(tmp_path / "run") if "loss" in r]
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in steps)
    if plugin == "activation_penalty.py":  # logged beside the LM loss, which stays the cross-entropy
        assert all(r["aux_loss"] == r["ffn_activation_l2"] > 0 for r in steps)


@pytest.mark.parametrize(
    "plugin, overrides, scalars",
    [("value_residual.py", VALUE_RESIDUAL, "mix"), ("x0_mixing.py", {"model.block": "x0-prenorm"}, "lambdas")],
)
def test_value_residual_and_x0_are_the_plain_block_at_identity_and_then_differ(plugin, overrides, scalars):
    """With tiny's weights, λ = 1 (value residual: a layer's own values only) and (λ, μ) = (1, 0) (x0: no
    embeddings mixed in) give plain tiny's logits; λ = μ = 0.5 brings layer 0's values / x0 in."""
    tokens = torch.randint(0, 256, (2, 32))
    plain, model = model_with(plugin, {}), model_with(plugin, overrides)
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert {name.rsplit(".", 1)[-1] for name in missing} == {scalars} and not unexpected
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mix"):
                p.fill_(1.0)  # the x0 block starts at (1, 0) by itself
    assert torch.allclose(model(tokens), plain(tokens), atol=1e-6)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(scalars):
                p.fill_(0.5)
    assert not torch.allclose(model(tokens), plain(tokens), atol=1e-3)


def test_value_residual_decodes_the_same_with_and_without_the_kv_cache():
    model = model_with("value_residual.py", VALUE_RESIDUAL).eval()
    prompt = torch.randint(0, 256, (12,)).tolist()
    assert generate(model, prompt, 10, temperature=0) == generate(model, prompt, 10, temperature=0, use_cache=False)


def test_a_factory_with_layer_gets_its_depth_and_inits_itself():
    model = model_with("depth_init.py", EXAMPLES["depth_init.py"], **{"model.n_layers": 4})
    for i, layer in enumerate(model.layers):
        assert layer.feed_forward.layer == i
        assert layer.feed_forward.w2.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * (i + 1)), rel=0.03)
        assert layer.feed_forward.w13.weight.std().item() == pytest.approx(0.02, rel=0.03)


def test_an_auxiliary_term_is_differentiated_and_kept_apart_from_the_lm_loss():
    model = model_with("activation_penalty.py", PENALTY)
    tokens = torch.randint(0, 256, (2, 33))
    losses = model.losses(tokens[:, :-1], tokens[:, 1:])
    assert set(losses) == {"loss", "aux_loss", "ffn_activation_l2"}
    assert torch.equal(losses["loss"], model.loss(tokens[:, :-1], tokens[:, 1:]))  # the LM cross-entropy alone
    hidden = []  # the term by hand: 0.01 · mean(hidden²) of each layer's gated hidden activations, summed
    handles = [
        layer.feed_forward.w2.register_forward_hook(lambda m, args, out: hidden.append(args[0]))
        for layer in model.layers
    ]
    model.losses(tokens[:, :-1], tokens[:, 1:])
    for handle in handles:
        handle.remove()
    expected = sum(0.01 * h.square().mean() for h in hidden)
    assert losses["ffn_activation_l2"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.equal(losses["aux_loss"], losses["ffn_activation_l2"])
    losses["aux_loss"].backward()  # the term alone reaches the feed-forward weights that make it...
    assert all(layer.feed_forward.w13.weight.grad.abs().sum() > 0 for layer in model.layers)
    assert model.output.weight.grad is None  # ...and not the LM head, which it does not depend on


def test_the_examples_compile_with_fullgraph_in_one_layered_model():
    """value residual on layers 0, 1, 3, x0 mixing on layer 2, the depth-scaled and penalised feed-forwards:
    compiled whole with fullgraph=True, equal to eager, and no recompile on a second batch."""
    overrides = {
        **VALUE_RESIDUAL,
        "model.feedforward": "depth-swiglu",
        "model.layer_pattern": ["a", "a", "b"],
        "model.layer_types": {"a": {}, "b": {"block": "x0-prenorm", "attention": "sdpa"}},
        "model.layer_overrides": {"-1": {"feedforward": {"name": "activation-penalty"}}},
    }
    recipe = minsota.load_recipe("tiny", overrides, plugin_specs=[str(LAYERS / p) for p in EXAMPLES])
    model = minsota.build_model(recipe)
    torch.compiler.reset()
    compiled = torch.compile(model.losses, fullgraph=True)
    for seed in (0, 1):
        tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(seed))
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = compiled(tokens[:, :-1], tokens[:, 1:])
        expected = model.losses(tokens[:, :-1], tokens[:, 1:])
        assert set(got) == {"loss", "aux_loss", "ffn_activation_l2"}
        for name in got:
            assert got[name].item() == pytest.approx(expected[name].item(), rel=1e-5)
    (got["loss"] + got["aux_loss"]).backward()
    assert model.layers[1].attention.mix.grad is not None and model.layers[2].lambdas.grad is not None


# The auxiliary loss over 1 and 2 ranks (DDP and FSDP2): tests/test_moe.py trains this plugin's feed-forward in the
# last layer of its MoE model, whose 2-rank runs check every loss term against one process's.
