"""Plugins and registries: entry-point discovery, local plugins, failures reported in one line naming
the plugin, duplicate names naming both providers, and the deliberate override switch."""

import json

import pytest

import minsota
from minsota.errors import UserError
from minsota.loader import recipe_from_dict, recipe_record
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
    assert (
        registry.describe("rmsnorm").summary == "Root-mean-square norm."
        and registry.describe("rmsnorm").provider == "p1"
    )
    with pytest.raises(UserError, match=r"unknown norm 'rmsnrm'; did you mean 'rmsnorm'\? \(`minsota list norm`"):
        registry.get("rmsnrm")
    with pytest.raises(UserError, match=r"unknown norm 'batchnorm' \(`minsota list norm`"):
        registry.get("batchnorm")  # nothing close: no suggestion, and never a silent fuzzy pick
    with pytest.raises(UserError, match="'layernorm' is registered by both plugin 'p2' and plugin 'p3'"):
        registry.register("layernorm", lambda dim, cfg: None, provider="p3")


@pytest.mark.parametrize("override_first", [False, True])
def test_an_override_holds_its_name_in_either_load_order(override_first):
    registry = Registry("norm")
    plain, replacement = (lambda dim, cfg: None), minsota.override(lambda dim, cfg: None)
    for factory, provider in [(plain, "builtin"), (replacement, "mine")][:: -1 if override_first else 1]:
        registry.register("rmsnorm", factory, provider=provider)
    assert registry.describe("rmsnorm").provider == "mine" and registry.get("rmsnorm") is replacement
    with pytest.raises(UserError, match="registered by both plugin 'mine' and plugin 'theirs'"):
        registry.register("rmsnorm", minsota.override(lambda dim, cfg: None), provider="theirs")


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
    recipe = minsota.load_recipe(
        "tiny", {"model.norm": "scalenorm", "model.feedforward": "bilinear"}, [example_on_path]
    )
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


def test_a_bug_in_a_plugins_code_is_reported_as_the_plugins(tmp_path):
    plugin = BROKEN / "fails_in_forward.py"
    proc = run(
        "train",
        "tiny",
        "--plugin",
        plugin,
        "--set",
        "model.norm=brokennorm",
        "--set",
        "train.steps=1",
        "--out",
        tmp_path / "run",
        env={"TQDM_DISABLE": "1"},
    )
    assert proc.returncode == 1 and "Traceback" in proc.stderr  # the plugin's author needs it
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(
        f"minsota: error in plugin 'fails_in_forward' (local {plugin.resolve()}) at {plugin.resolve()}:15: RuntimeError"
    ), line


def test_override_switch_replaces_a_name_deliberately():
    plugins = minsota.load_plugins([BROKEN / "override_norm.py"])
    entry = plugins.registry("norm").describe("rmsnorm")
    assert entry.provider == "override_norm" and entry.factory.__name__ == "LoudRMSNorm"


def test_recipe_can_bring_its_own_plugins(tmp_path, example_on_path):
    (tmp_path / "r.toml").write_text(
        f'extends = "tiny"\nplugins = ["{example_on_path}"]\n[model]\nnorm = "scalenorm"\n'
    )
    recipe = minsota.load_recipe(tmp_path / "r.toml")
    assert type(minsota.build_model(recipe).norm).__name__ == "ScaleNorm"
    assert (
        recipe.plugins == ["minsota_example"] and recipe_record(recipe)["loaded_plugins"]["minsota_example"] == "local"
    )


def test_list_and_plugins_commands(cli):
    code, out, _ = cli("list", "norm")
    assert code == 0 and ["norm", "rmsnorm", "norms"] in [line.split()[:3] for line in out.splitlines()]
    code, out, _ = cli("plugins")
    assert code == 0 and any(line.split()[:3] == ["norms", "minsota", minsota.__version__] for line in out.splitlines())
    code, _, err = cli("list", "normz")
    assert code == 2 and "unknown component kind 'normz'" in err


SCALENORM = '''"""ScaleNorm as a local plugin file."""
import torch
from torch import nn
from minsota import hookimpl

class ScaleNorm(nn.Module):
    """ScaleNorm: g · x / ||x||."""
    def __init__(self, dim, cfg, eps=1e-5):
        super().__init__()
        self.eps, self.g = eps, nn.Parameter(torch.tensor(dim ** 0.5))
    def forward(self, x):
        return self.g * x / x.norm(dim=-1, keepdim=True).clamp_min(self.eps)

@hookimpl
def minsota_register_norms():
    return {"scalenorm": ScaleNorm}
'''


@pytest.fixture
def plugin_file(tmp_path):
    (tmp_path / "myplug.py").write_text(SCALENORM)
    return tmp_path / "myplug.py"


def test_a_plugin_named_twice_is_loaded_once(plugin_file, monkeypatch):
    monkeypatch.chdir(plugin_file.parent)
    plugins = minsota.load_plugins([plugin_file, "myplug.py", "./myplug.py"])  # one file, three spellings
    assert [n for n, i in plugins.infos.items() if i.distribution == "local"] == ["myplug"]
    assert plugins.registry("norm").describe("scalenorm").provider == "myplug"
    # --plugin and the recipe's plugins list, and a chain naming it in the parent and the child
    (plugin_file.parent / "parent.toml").write_text('extends = "tiny"\nplugins = ["myplug.py"]\n')
    (plugin_file.parent / "child.toml").write_text(
        'extends = "parent.toml"\nplugins = ["myplug.py"]\n[model]\nnorm = "scalenorm"\n'
    )
    recipe = minsota.load_recipe(plugin_file.parent / "child.toml", plugin_specs=["myplug.py"])
    assert recipe.plugins == [str(plugin_file.resolve())]
    assert type(minsota.build_model(recipe).norm).__name__ == "ScaleNorm"
    # a run's recipe.json lists it, and `--resume RUN --plugin myplug.py` (compare's resume) names it again
    again = recipe_from_dict(recipe.to_dict(), "recipe.json", None, ["myplug.py", *recipe.plugins])
    assert again.plugins == [str(plugin_file.resolve())] and again.model.norm == "scalenorm"


def test_a_relative_plugin_path_is_stored_absolute_and_resumes_elsewhere(plugin_file, monkeypatch, cli):
    here, elsewhere, run_dir = plugin_file.parent, plugin_file.parent / "elsewhere", plugin_file.parent / "run"
    elsewhere.mkdir()
    quick = [
        f"--set=train.{key}"
        for key in ("steps=2", "sample_tokens=0", "eval_batches=1", "batch_size=2", "micro_batch_size=2", "seq_len=32")
    ]
    monkeypatch.chdir(here)
    code, _, err = cli(
        "train",
        "tiny",
        "--plugin",
        "myplug.py",
        "--set",
        "model.norm=scalenorm",
        "--set",
        "data.num_workers=0",
        *quick,
        "--out",
        run_dir,
    )
    assert code == 0, err
    assert json.loads((run_dir / "recipe.json").read_text())["plugins"] == [str(plugin_file.resolve())]
    monkeypatch.chdir(elsewhere)  # where "myplug.py" names nothing
    code, _, err = cli("train", "--resume", run_dir, "--set", "train.steps=3")
    assert code == 0, err
    code, _, err = cli("train", "--resume", run_dir, "--set", "train.steps=4", "--plugin", "../myplug.py")
    assert code == 0, err
    assert json.loads((run_dir / "recipe.json").read_text())["plugins"] == [str(plugin_file.resolve())]
    assert (run_dir / "checkpoints" / "step-4").is_dir()
