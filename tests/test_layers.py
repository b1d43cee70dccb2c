"""Layer layouts: `layer_pattern`, `layer_types`, `layer_overrides` — the resolution rule, its errors (one line,
exit 2, file and dotted key), `extends` and `--set` on them, shared positional modules, `layer=` for factories
that ask, `show`/`diff` output, `recipe.json`, and FLOPs counted per layer."""

import json

import pytest

import minsota
from minsota.components import attention_flops
from minsota.recipe import layer_specs

LOCAL_GLOBAL = """extends = "tiny"
[model]
n_layers = 6
layer_pattern = ["local", "local", "global"]
[model.layer_types.local]
attention = { name = "sdpa", window = 16 }
[model.layer_types.global]
positional = { name = "rope", theta = 1000000.0 }
[model.layer_overrides.-1]
feedforward = "geglu"
"""


def write(path, text):
    path.write_text(text)
    return path


@pytest.fixture
def local_global(tmp_path):
    return write(tmp_path / "lg.toml", LOCAL_GLOBAL)


def test_a_layer_is_model_then_its_type_then_its_override(local_global):
    specs = layer_specs(minsota.load_recipe(local_global).model)
    assert [s["attention"] for s in specs] == [{"name": "sdpa", "window": 16}] * 2 + ["sdpa"] + [
        {"name": "sdpa", "window": 16}
    ] * 2 + ["sdpa"]
    rope = {"name": "rope", "theta": 10000.0}  # tiny's, kept where the type says nothing
    assert [s["positional"] for s in specs] == [rope, rope, {"name": "rope", "theta": 1000000.0}] * 2
    assert [s["feedforward"] for s in specs] == ["swiglu"] * 5 + ["geglu"]  # -1: the last layer
    assert {s["block"] for s in specs} == {"prenorm"}


def test_equal_positional_specs_share_one_module(local_global):
    model = minsota.build_model(minsota.load_recipe(local_global))
    rotations = [layer.attention.positional for layer in model.layers]
    assert rotations[0] is rotations[1] is rotations[3] is rotations[4] is model.positional  # tiny's own rope
    assert rotations[2] is rotations[5] and rotations[2] is not rotations[0]
    assert rotations[2].inv_freq[1] < rotations[0].inv_freq[1]  # θ = 1e6 turns slower
    assert len(model.positionals) == 1


def test_layer_tables_through_extends_and_set(tmp_path, local_global):
    child = write(tmp_path / "child.toml", 'extends = "lg.toml"\n[model.layer_types.global]\nattention = "math"\n')
    specs = layer_specs(minsota.load_recipe(child).model)
    # the child's `global` replaces the parent's whole (its positional is gone); `local` is inherited
    assert specs[2]["attention"] == "math" and specs[2]["positional"] == {"name": "rope", "theta": 10000.0}
    assert specs[0]["attention"] == {"name": "sdpa", "window": 16}
    recipe = minsota.load_recipe(
        child, {"model.layer_types.local.attention.window": 8, "model.layer_types.global.attention.window": 4}
    )
    specs = layer_specs(recipe.model)
    assert specs[0]["attention"] == {"name": "sdpa", "window": 8}
    assert specs[2]["attention"] == {"name": "math", "window": 4}  # a name becomes its inline table
    assert recipe.where("model.layer_types.local.attention") == "--set model.layer_types.local.attention.window"
    inherited = minsota.load_recipe(child)
    assert inherited.where("model.layer_types.local.attention") == str(local_global)
    assert inherited.where("model.layer_types.global.attention") == str(child)


@pytest.mark.parametrize(
    "text, key, message",
    [
        ('layer_pattern = ["a"]\n', "model.layer_pattern", "needs its types defined as tables"),
        (
            'layer_pattern = ["local", "glob"]\n[model.layer_types.local]\n[model.layer_types.global]\n',
            "model.layer_pattern",
            "type 'glob' is not defined in model.layer_types (did you mean 'global'?)",
        ),
        (
            '[model.layer_overrides.4]\nfeedforward = "geglu"\n',
            "model.layer_overrides.4",
            "layer 4 is out of range for model.n_layers = 4",
        ),
        ('[model.layer_overrides.-5]\nfeedforward = "geglu"\n', "model.layer_overrides.-5", "out of range"),
        ('[model.layer_overrides.x]\nfeedforward = "geglu"\n', "model.layer_overrides.x", "must be an integer"),
        (
            '[model.layer_overrides.0]\nfeedforward = "geglu"\n[model.layer_overrides.-4]\nblock = "parallel"\n',
            "model.layer_overrides.-4",
            "names the same layer as model.layer_overrides.0",
        ),
        (
            'layer_pattern = ["local"]\n[model.layer_types.local]\natention = "math"\n',
            "model.layer_types.local.atention",
            "did you mean 'attention'?",
        ),
        (
            'layer_pattern = ["local"]\n[model.layer_types.local]\nattention = "flash9"\n',
            "model.layer_types.local.attention",
            "unknown attention 'flash9'",
        ),
        ("[model.layer_overrides.0]\nnorm = { eps = 1e-6 }\n", "model.layer_overrides.0.norm", "string 'name'"),
        (
            'layer_pattern = ["local"]\n[model.layer_types.local]\nattention = { name = "sdpa", windw = 4 }\n',
            "model.layer_types.local.attention",
            "windw",
        ),  # a bad option: refused when the model is built
    ],
)
def test_bad_layer_tables_are_one_line_exit_2_naming_file_and_key(cli, tmp_path, text, key, message):
    recipe = write(tmp_path / "bad.toml", f'extends = "tiny"\n[model]\n{text}')
    code, _, err = cli("train", recipe, "--set", "train.steps=1", "--out", tmp_path / "run")
    assert code == 2 and err.count("\n") == 1, err
    assert f"{recipe}: " in err and key in err and message in err, err
    assert not (tmp_path / "run").exists()


def test_a_bad_set_into_a_layer_table_names_the_set(cli, tmp_path, local_global):
    code, _, err = cli("show", local_global, "--set", "model.layer_types.local.attention.window=-1")
    assert code == 2 and "--set model.layer_types.local.attention.window" in err and "window" in err, err
    code, _, err = cli("show", local_global, "--set", "model.n_layers.x=1")
    assert code == 2 and "--set model.n_layers.x: 'n_layers' is 6, not a table" in err, err


def test_show_prints_one_line_per_distinct_layer(cli, local_global):
    code, out, _ = cli("show", local_global)
    assert code == 0
    layout = out.split("layout:\n")[1].split("parameters:")[0].splitlines()
    assert layout == [
        (
            '  layers 0-1, 3-4 (4): positional = {name = "rope", theta = 10000.0}  '
            'attention = {name = "sdpa", window = 16}  feedforward = "swiglu"'
        ),
        '  layer 2: positional = {name = "rope", theta = 1000000.0}  attention = "sdpa"  feedforward = "swiglu"',
        '  layer 5: positional = {name = "rope", theta = 1000000.0}  attention = "sdpa"  feedforward = "geglu"',
    ]
    code, out, _ = cli("show", "tiny")
    assert "layout:\n  layers 0-3: all alike\n" in out


def test_diff_shows_the_layout_difference(cli, local_global):
    code, out, _ = cli("diff", "tiny", local_global)
    assert code == 0
    assert "model.layer_types.local.attention.window" in out and "layout\n  tiny:\n    layers 0-3: all alike" in out
    assert "    layer 5: " in out


def test_recipe_json_stores_every_layer_resolved(tmp_path, local_global, cli):
    code, _, err = cli(
        "train",
        local_global,
        "--set",
        "train.steps=1",
        "--set",
        "train.sample_tokens=0",
        "--set",
        "train.eval_batches=1",
        "--out",
        tmp_path / "run",
    )
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert saved["layers"] == layer_specs(minsota.load_recipe(local_global).model) and len(saved["layers"]) == 6
    assert saved["layers"][5]["feedforward"] == "geglu"


def test_flops_of_a_local_global_recipe_equal_a_hand_count(local_global):
    model = minsota.build_model(minsota.load_recipe(local_global))
    cfg, T, W = model.cfg, 64, 16
    dim, hd, H, KV = cfg.dim, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    attention_weights = dim * (H + 2 * KV) * hd + H * hd * dim
    swiglu, geglu = 3 * dim * 384, 3 * dim * 384  # both gated, hidden 8/3·128 rounded up to 384
    # keys per query, in the continuous count minsota uses (T/2 causal): a window of 16 in 64 tokens sees
    # 16 keys but for the first 16 queries, which see 8 on average: (48·16 + 16·8) / 64 = 14
    local_keys, global_keys = 14, 32
    scores = 4 * H * hd * (4 * local_keys + 2 * global_keys)
    forward = 2 * (6 * attention_weights + 5 * swiglu + geglu + dim * cfg.vocab_size) + scores
    assert model.flops_per_token(T, training=False) == pytest.approx(forward, rel=1e-12)
    assert model.flops_per_token(T) == pytest.approx(3 * forward, rel=1e-12)
    assert attention_flops(H, hd, T, W) == pytest.approx(4 * H * hd * local_keys, rel=1e-12)


def test_factories_naming_layer_get_their_index(tmp_path):
    plugin = write(
        tmp_path / "depth.py",
        """
from minsota import hookimpl
from minsota.builtins.feedforward import MLP

class Seen(MLP):
    def __init__(self, cfg, layer):
        super().__init__(cfg, "relu2")
        self.layer = layer

@hookimpl
def minsota_register_feedforwards():
    return {"seen": Seen}
""",
    )
    recipe = minsota.load_recipe("tiny", {"model.feedforward": "seen"}, plugin_specs=[str(plugin)])
    assert [layer.feed_forward.layer for layer in minsota.build_model(recipe).layers] == [0, 1, 2, 3]
