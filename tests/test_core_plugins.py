"""Plugins and registries: entry-point discovery, local plugins, failures reported in one line naming
the plugin, duplicate names naming both providers, and the deliberate override switch."""

import pytest

import minsota
from minsota.errors import UserError
from minsota.registry import Registry
from conftest import PLUGINS, run

BROKEN = PLUGINS / "broken"


def test_registry_get_list_describe_and_did_you_mean():
    registry = Registry("norm")

    @registry.register("rmsnorm", provider="p1")
    def rms(dim, cfg):
        """Root-mean-square norm."""

    registry.register("layernorm", lambda dim, cfg: None, summary="LayerNorm", provider="p2")
    assert registry.get("rmsnorm") is rms
    assert registry.list() == ["layernorm", "rmsnorm"] and registry.list("rms*") == ["rmsnorm"]
    assert registry.describe("rmsnorm").summary == "Root-mean-square norm." and registry.describe("rmsnorm").provider == "p1"
    with pytest.raises(UserError, match=r"unknown norm 'rmsnrm'; did you mean 'rmsnorm'\? \(`minsota list norm`"):
        registry.get("rmsnrm")
    with pytest.raises(UserError, match=r"unknown norm 'batchnorm' \(`minsota list norm`"):
        registry.get("batchnorm")  # nothing close: no suggestion, and never a silent fuzzy pick
    with pytest.raises(UserError, match="'layernorm' is registered by both plugin 'p2' and plugin 'p3'"):
        registry.register("layernorm", lambda dim, cfg: None, provider="p3")


def test_builtins_load_through_entry_points_and_are_attributed():
    plugins = minsota.load_plugins()
    assert {"norms", "positional", "attention", "feedforward", "blocks", "recipes"} <= set(plugins.infos)
    assert all(plugins.infos[name].distribution == "minsota" for name in ("norms", "blocks"))
    assert plugins.registry("norm").describe("rmsnorm").provider == "norms"
    assert {"sota-2024", "tiny", "quickstart"} <= set(plugins.registry("recipe").list())


@pytest.fixture
def example_on_path(monkeypatch):
    """The example plugin importable by module name, as `--plugin minsota_example` would find it."""
    monkeypatch.syspath_prepend(str(PLUGINS / "minsota-example"))
    return "minsota_example"


def test_local_plugin_module_components_build_by_name(example_on_path):
    recipe = minsota.load_recipe("tiny", {"model.norm": "scalenorm", "model.feedforward": "bilinear"}, [example_on_path])
    model = minsota.build_model(recipe)
    assert type(model.norm).__name__ == "ScaleNorm" and type(model.layers[0].feed_forward).__name__ == "Bilinear"


@pytest.mark.parametrize(
    "plugin, message",
    [
        ("raises_on_import.py", "plugin 'raises_on_import' (local "),
        ("misspelt_hook.py", "minsota_register_norm"),
        ("raises_in_hook.py", "raised in minsota_register_feedforwards: KeyError"),
        ("duplicate_norm.py", "norm 'rmsnorm' is registered by both plugin 'norms' and plugin 'duplicate_norm'"),
    ],
)
def test_broken_plugins_are_one_line_exit_2(cli, plugin, message):
    code, _, err = cli("list", "--plugin", BROKEN / plugin)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert plugin.removesuffix(".py") in err


def test_broken_plugin_in_a_real_process_has_no_traceback():
    proc = run("recipes", "--plugin", BROKEN / "raises_on_import.py")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "failed to import: RuntimeError: this plugin is broken on purpose" in proc.stderr


def test_override_switch_replaces_a_name_deliberately():
    plugins = minsota.load_plugins([BROKEN / "override_norm.py"])
    entry = plugins.registry("norm").describe("rmsnorm")
    assert entry.provider == "override_norm" and entry.factory.__name__ == "LoudRMSNorm"


def test_recipe_can_bring_its_own_plugins(tmp_path, example_on_path):
    (tmp_path / "r.toml").write_text(f'extends = "tiny"\nplugins = ["{example_on_path}"]\n[model]\nnorm = "scalenorm"\n')
    recipe = minsota.load_recipe(tmp_path / "r.toml")
    assert type(minsota.build_model(recipe).norm).__name__ == "ScaleNorm"
    assert recipe.plugins == ["minsota_example"] and recipe.to_dict()["loaded_plugins"]["minsota_example"] == "local"


def test_list_and_plugins_commands(cli):
    code, out, _ = cli("list", "norm")
    assert code == 0 and ["norm", "rmsnorm", "norms"] in [line.split()[:3] for line in out.splitlines()]
    code, out, _ = cli("plugins")
    assert code == 0 and any(line.split()[:3] == ["norms", "minsota", minsota.__version__] for line in out.splitlines())
    code, _, err = cli("list", "normz")
    assert code == 2 and "unknown component kind 'normz'" in err
