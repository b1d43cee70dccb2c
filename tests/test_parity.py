"""Parity: every registered component with a reference, every block and every recipe's decoder (shrunk to toy
sizes) against `minsota.reference`, forward and gradients.

Cases come from the registries, so a new built-in — or an installed plugin whose module class carries a
``reference`` — is covered without a new test. Tolerances are relative to the reference's scale:
fp32: max |actual - expected| <= 1e-5 · max |expected|; bf16 autocast (forward only, against the fp32
reference): <= 3e-2 · max |expected| — bf16 keeps 8 mantissa bits (2^-8 ≈ 4e-3 per rounding) and a toy
decoder rounds a few dozen times along each path.
"""

from functools import partial

import pytest
import torch

import minsota
from minsota import reference
from minsota.errors import UserError
from minsota.loader import load_recipe
from minsota.model import build_component
from minsota.reference import assert_close
from minsota.state import make_state

FP32, BF16 = 1e-5, 3e-2
SHRINK = {
    "model.dim": 32,
    "model.n_layers": 2,
    "model.n_heads": 4,
    "model.head_dim": 8,
    "model.vocab_size": 64,
    "model.ffn_dim": 48,
    "model.max_seq_len": 32,
    "train.seq_len": 32,
}
PLUGINS = minsota.load_plugins()
CFG = load_recipe("tiny", {**SHRINK, "model.n_kv_heads": 2}).model
B, T = 2, 12
DOCUMENTS = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])  # a packed row and a plain one
POSITIONS = torch.tensor([list(range(5)) + list(range(7)), list(range(12))])

# option sets checked beyond each component's defaults (each option changes the output on the inputs below)
VARIANTS = {
    "norm": {
        "rmsnorm": [{"eps": 1e-3}, {"offset": 1.0, "eps": 1e-6}],
        "rmsnorm-noparam": [{"eps": 1e-3}],
        "layernorm": [{"bias": False}, {"eps": 1e-3}],
    },
    "positional": {
        "rope": [
            {"theta": 500.0},
            {"use_xpos": True},
            {"use_xpos": True, "xpos_scale_base": 16.0},
            {"interpolate_factor": 4.0},
            {"theta_rescale_factor": 8.0},
            {
                "scaling": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            {"scaling": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
            {
                "scaling": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "attention_factor": 1.5,
                "beta_fast": 8.0,
            },
        ]
    },
    "attention": {
        "sdpa": [{"window": 3}, {"bias": True}, {"qk_norm": "head"}, {"qk_norm": "full"}, {"scale": 0.2, "window": 3}],
        "math": [{"window": 3}, {"softcap": 2.0}, {"qk_norm": "full", "bias": True}, {"scale": 0.2, "softcap": 2.0}],
    },
    "feedforward": {
        "geglu": [{"approximate": "tanh"}],
        "mlp": [{"approximate": "tanh", "bias": True}],
        "relu2": [{"bias": True}],
    },
    "block": {"sandwich": [{"pre": False}]},
}


def cases(kind, plugins=PLUGINS):
    """(name, options) for every registered component of ``kind``: its defaults, then each variant."""
    return [
        pytest.param(name, options, id="-".join([name, *(f"{k}={v}" for k, v in options.items())]))
        for name in plugins.registry(kind).list()
        for options in [{}, *VARIANTS[kind].get(name, [])]
    ]


def check(run, run_reference, inputs, module, what):
    """Forward (fp32 and bf16 autocast) and gradients of the inputs and every parameter of ``module``."""
    leaves = {**{f"input {i}": x for i, x in enumerate(inputs)}, **dict(module.named_parameters())}
    expected = run_reference()
    actual = run()
    assert_close(actual, expected, FP32, f"{what} forward")
    weight = torch.randn_like(expected)  # a random cotangent reaches every output element
    grads = torch.autograd.grad((actual * weight).sum(), list(leaves.values()), allow_unused=True)
    reference_grads = torch.autograd.grad((expected * weight).sum(), list(leaves.values()), allow_unused=True)
    for name, grad, reference_grad in zip(leaves, grads, reference_grads):
        assert (grad is None) == (reference_grad is None), f"{what}: gradient of {name} exists on one side only"
        if grad is not None:
            assert_close(grad, reference_grad, FP32, f"{what} gradient of {name}")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = run()
    assert_close(low, expected, BF16, f"{what} bf16 forward")


def skip_without_reference(module):
    if reference.of(module) is None:
        pytest.skip(f"{type(module).__name__} has no reference")


def norm_factory(name="rmsnorm"):
    factory = PLUGINS.registry("norm").get(name)
    return lambda dim=CFG.dim: build_component(factory, name, {}, CFG, dim, CFG)


def build(kind, name, options, plugins=PLUGINS, positional="rope"):
    """A component as the model builder makes it (its `Spec` recorded), parameters off their initial values."""
    factory = plugins.registry(kind).get(name)
    torch.manual_seed(0)
    if kind == "norm":
        module = build_component(factory, name, options, CFG, CFG.dim, CFG)
    elif kind == "attention":
        module = build_component(
            factory, name, options, CFG, CFG, build("positional", positional, {}), norm=norm_factory()
        )
    elif kind == "block":
        module = build_component(
            factory,
            name,
            options,
            CFG,
            CFG,
            norm=norm_factory(),
            attention=build("attention", "sdpa", {"qk_norm": "head"}),
            feedforward=build("feedforward", "swiglu", {}),
        )
    else:
        module = build_component(factory, name, options, CFG, CFG)
    with torch.no_grad():  # off their identity inits, so gains and biases matter
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return module


def hidden(*shape, scale=1.0):
    torch.manual_seed(1)
    return (torch.randn(*shape) * scale).requires_grad_()


def check_norm(module, what):
    """Rows of RMS 3e-4 to 3 (log-spaced): the small ones are where eps decides the output."""
    x = hidden(B, T, CFG.dim) * torch.logspace(-3.5, 0.5, B * T).view(B, T, 1)
    x = x.detach().requires_grad_()
    check(lambda: module(x), lambda: reference.call(module, x), [x], module, what)


@pytest.mark.parametrize("name, options", cases("norm"))
def test_norm(name, options):
    module = build("norm", name, options)
    skip_without_reference(module)
    check_norm(module, f"norm {name} {options}")


@pytest.mark.parametrize("name, options", cases("feedforward"))
def test_feedforward(name, options):
    module = build("feedforward", name, options)
    skip_without_reference(module)
    x = hidden(B, T, CFG.dim)
    check(lambda: module(x), lambda: reference.call(module, x), [x], module, f"feedforward {name} {options}")


@pytest.mark.parametrize("name, options", cases("positional"))
def test_positional(name, options):
    module = build("positional", name, options)
    skip_without_reference(module)
    ref = reference.of(module)
    x, q, k = hidden(B, T, CFG.dim), hidden(B, CFG.n_heads, T, CFG.head_dim), hidden(B, CFG.n_kv_heads, T, CFG.head_dim)
    positions = POSITIONS * 2  # past the scaled recipes' original context (16), within the learned table (32)

    def outputs(embed, rotate, bias):
        parts = [embed(x, positions), *rotate(q, k, positions)]
        parts += [] if bias(positions, CFG.n_heads) is None else [bias(positions, CFG.n_heads)]
        return torch.cat([p.flatten() for p in parts])

    assert (module.bias(positions, CFG.n_heads) is None) == (ref.bias(module, positions, CFG.n_heads) is None)
    check(
        lambda: outputs(module.embed, module.rotate, module.bias),
        lambda: outputs(partial(ref.embed, module), partial(ref.rotate, module), partial(ref.bias, module)),
        [x, q, k],
        module,
        f"positional {name} {options}",
    )


@pytest.mark.parametrize("documents", [False, True], ids=["causal", "documents"])
@pytest.mark.parametrize("name, options", cases("attention"))
def test_attention(name, options, documents):
    module = build("attention", name, options)
    skip_without_reference(module)
    x = hidden(B, T, CFG.dim)
    document_ids = DOCUMENTS if documents else None
    positions = POSITIONS if documents else torch.arange(T).expand(B, T)
    check(
        lambda: module(x, positions, document_ids),
        lambda: reference.call(module, x, positions, document_ids),
        [x],
        module,
        f"attention {name} {options}",
    )


@pytest.mark.parametrize("positional", PLUGINS.registry("positional").list())
@pytest.mark.parametrize("name", PLUGINS.registry("attention").list())
def test_attention_with_each_positional_encoding(name, positional):
    module = build("attention", name, {}, positional=positional)
    skip_without_reference(module)
    x = hidden(B, T, CFG.dim)
    check(
        lambda: module(x, POSITIONS, DOCUMENTS),
        lambda: reference.call(module, x, POSITIONS, DOCUMENTS),
        [x],
        module,
        f"attention {name} with {positional}",
    )


@pytest.mark.parametrize("name, options", cases("block"))
def test_block(name, options):
    module = build("block", name, options)
    skip_without_reference(module)
    x = hidden(B, T, CFG.dim)
    check(
        lambda: module(make_state(x, POSITIONS, DOCUMENTS))["hidden"],
        lambda: reference.call(module, x, POSITIONS, DOCUMENTS),
        [x],
        module,
        f"block {name} {options}",
    )


def shrunk(recipe_name):
    """A recipe at toy size, keeping its kind of attention: MHA stays MHA, MQA stays MQA, GQA becomes 4:2."""
    model = load_recipe(recipe_name).model
    kv_heads = {model.n_heads: 4, 1: 1}.get(model.n_kv_heads, 2)
    return load_recipe(recipe_name, {**SHRINK, "model.n_kv_heads": kv_heads})


@pytest.mark.parametrize("recipe_name", PLUGINS.registry("recipe").list())
def test_decoder(recipe_name):
    torch.manual_seed(0)
    model = minsota.build_model(shrunk(recipe_name))
    tokens = torch.randint(0, 64, (B, T))
    check(
        lambda: model(tokens, POSITIONS, DOCUMENTS),
        lambda: reference.decoder(model, tokens, POSITIONS, DOCUMENTS),
        [],
        model,
        f"decoder {recipe_name}",
    )


def test_parity_catches_a_wrong_plugin_component(tmp_path):
    """A plugin's reference is picked up from its class, and a component that disagrees with it fails."""
    plugin = tmp_path / "scaled_norm.py"
    plugin.write_text(
        "import torch\nfrom minsota import hookimpl\nfrom minsota.reference import rms_norm\n\n"
        "class OffByAFraction(torch.nn.Module):\n"
        "    reference = staticmethod(rms_norm)\n"
        "    def __init__(self, dim, cfg, eps=1e-5):\n"
        "        super().__init__()\n"
        "        self.eps, self.weight = eps, torch.nn.Parameter(torch.ones(dim))\n"
        "    def forward(self, x):\n"
        "        return rms_norm(self, x) * 1.001\n\n"
        "@hookimpl\ndef minsota_register_norms():\n    return {'off-by-a-fraction': OffByAFraction}\n"
    )
    plugins = minsota.load_plugins([str(plugin)])
    assert "off-by-a-fraction" in [case.values[0] for case in cases("norm", plugins)]
    with pytest.raises(AssertionError, match=r"max abs diff .* mean abs diff"):
        check_norm(build("norm", "off-by-a-fraction", {}, plugins), "off-by-a-fraction")


IGNORES_AN_OPTION = """
import torch
from minsota import hookimpl
from minsota.builtins.norms import RMSNorm
from minsota.builtins.positional import Rope

class FixedEps(RMSNorm):
    def __init__(self, dim, cfg, eps=1e-5):
        super().__init__(dim, cfg)  # eps dropped: always the default

class NoNTK(Rope):
    def __init__(self, cfg, theta_rescale_factor=1.0, **options):
        super().__init__(cfg, **options)  # theta_rescale_factor dropped

@hookimpl
def minsota_register_norms():
    return {"fixed-eps": FixedEps}

@hookimpl
def minsota_register_positional_encodings():
    return {"no-ntk": NoNTK}
"""


@pytest.mark.parametrize(
    "kind, name, options",
    [("norm", "fixed-eps", {"eps": 1e-3}), ("positional", "no-ntk", {"theta_rescale_factor": 8.0})],
)
def test_parity_catches_a_component_that_ignores_an_option(tmp_path, kind, name, options):
    """The reference restates the math from the recipe's options, not from the module: a module that drops
    an option it accepts disagrees (with the option at its default, it agrees)."""
    plugin = tmp_path / "ignores_an_option.py"
    plugin.write_text(IGNORES_AN_OPTION)
    plugins = minsota.load_plugins([str(plugin)])

    def run(module):
        if kind == "norm":
            return check_norm(module, name)
        q, k = hidden(B, CFG.n_heads, T, CFG.head_dim), hidden(B, CFG.n_kv_heads, T, CFG.head_dim)

        def flat(parts):
            return torch.cat([x.flatten() for x in parts])

        check(
            lambda: flat(module.rotate(q, k, POSITIONS)),
            lambda: flat(reference.rope_rotate(module, q, k, POSITIONS)),
            [q, k],
            module,
            name,
        )

    for opts, fails in (({}, False), (options, True)):
        module = build(kind, name, opts, plugins)
        if fails:
            with pytest.raises(AssertionError, match="max abs diff"):
                run(module)
        else:
            run(module)


def test_rope_is_exact_in_bf16_far_from_the_origin():
    """rotary-embedding-torch would build bf16 positions under autocast (only 641 of 2048 distinct); ours are fp32."""
    module = build("positional", "rope", {})
    q, k = hidden(1, CFG.n_heads, 64, CFG.head_dim), hidden(1, CFG.n_kv_heads, 64, CFG.head_dim)
    positions = torch.arange(4000, 4064)[None]
    expected = reference.rope_rotate(module, q, k, positions)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = module.rotate(q.bfloat16(), k.bfloat16(), positions)
    for a, e in zip(actual, expected):
        assert_close(a, e, 1e-2, "bf16 rope at positions 4000..4063")


def test_rope_frequencies():
    inv_freq = build("positional", "rope", {"theta": 500000.0}).inv_freq
    assert torch.allclose(inv_freq, 500000.0 ** -(torch.arange(0, CFG.head_dim, 2) / CFG.head_dim))
    llama3 = build(
        "positional",
        "rope",
        {
            "theta": 500000.0,
            "scaling": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ).inv_freq
    turns = inv_freq * 8192 / (2 * torch.pi)  # 1304, 49, 1.8, 0.07: kept, kept, blended, interpolated
    assert torch.equal(llama3[:2], inv_freq[:2]) and llama3[3] == inv_freq[3] / 8
    assert inv_freq[2] / 8 < llama3[2] < inv_freq[2] and 1 < turns[2] < 4


def test_alibi_slopes():
    from minsota.builtins.positional import alibi_slopes

    assert alibi_slopes(8) == [2.0**-i for i in range(1, 9)]
    assert alibi_slopes(6) == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]


@pytest.mark.skipif(not hasattr(torch.nn.attention, "flex_attention"), reason="no flex_attention in this torch")
@pytest.mark.filterwarnings("error:flex_attention called without torch.compile")  # eager flex: (T, T) scores
def test_flex_path_matches_the_dense_mask():
    """The CUDA document/window path (compiled flex_attention), run forward on CPU (flex has no CPU backward in
    this torch)."""
    from minsota.builtins.attention import flex_attend, visible_keys

    q, k, v = (hidden(B, heads, 16, 8).detach() for heads in (4, 2, 2))
    document_ids = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])
    for documents, window in [(document_ids, 0), (document_ids, 5), (None, 5), (document_ids.clone(), 0)]:
        expected = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=visible_keys(16, documents, window, "cpu"), enable_gqa=True
        )
        assert_close(flex_attend(q, k, v, documents, window), expected, FP32, f"flex_attention window {window}")


@pytest.mark.parametrize("name", PLUGINS.registry("norm").list())
def test_norm_keeps_the_input_dtype_under_autocast(name):
    """An fp32 gain must not promote a bf16 input to fp32: with QK-norm, SDPA/flex would get fp32 q, k, bf16 v."""
    norm = build("norm", name, {})
    x = hidden(B, T, CFG.dim).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(x.bfloat16()).dtype == torch.bfloat16 and norm(x).dtype == torch.float32


def test_a_kernel_refuses_what_it_cannot_do():
    with pytest.raises(UserError) as error:
        minsota.build_model(load_recipe("tiny", {"model.attention": {"name": "sdpa", "softcap": 50.0}}), "meta")
    message = str(error.value)
    assert "\n" not in message and "model.attention = 'sdpa'" in message and "softcap" in message and "math" in message


@pytest.mark.parametrize(
    "attention, message",
    [
        ({"name": "sdpa", "qk_norm": "yes"}, "qk_norm must be"),
        ({"name": "math", "window": -1}, "must be >= 0"),
    ],
)
def test_bad_attention_options_are_one_line_errors(attention, message):
    with pytest.raises(UserError, match=message):
        minsota.build_model(load_recipe("tiny", {"model.attention": attention}), "meta")


@pytest.mark.parametrize(
    "positional, message",
    [
        ({"name": "rope", "scaling": "dynamic", "factor": 2.0}, "scaling must be 'llama3' or 'yarn'"),
        ({"name": "rope", "factor": 2.0}, "need scaling"),
        (
            {"name": "rope", "scaling": "yarn", "factor": 2.0, "original_max_position_embeddings": 8, "use_xpos": True},
            "replaces",
        ),
        ({"name": "rope", "scaling": "llama3", "factor": 2.0}, "low_freq_factor"),
    ],
)
def test_bad_rope_options_are_one_line_errors(positional, message):
    with pytest.raises(UserError, match=message):
        minsota.build_model(load_recipe("tiny", {"model.positional": positional}), "meta")


def test_structure_options():
    model = minsota.build_model(
        load_recipe("tiny", {"model.block": {"name": "sandwich", "pre": False}, "model.final_norm": False}), "meta"
    )
    names = {name.split(".", 2)[-1] for name, _ in model.named_parameters() if name.startswith("layers.0.")}
    assert {"attention_out_norm.weight", "ffn_out_norm.weight"} <= names and "attention_norm.weight" not in names
    assert isinstance(model.norm, torch.nn.Identity)
