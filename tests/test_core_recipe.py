"""Recipes: lookup by name or path, extends, typed --set overrides, and every bad-recipe case
(exit 2, one line on stderr naming the file and key, no traceback, nothing written)."""

import json
import subprocess
import sys

import pytest

import minsota
from minsota.recipe import parse_override

from conftest import run


def write(path, text):
    path.write_text(text)
    return path


TINY_MODEL = "[model]\ndim = 64\nn_layers = 2\nn_heads = 4\nvocab_size = 256\n"


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_layers=2.5", "model.n_layers must be int, got 2.5"),
        ("model.n_layers=abc", "model.n_layers must be int, got 'abc'"),
        ("model.n_layers=0", "model.n_layers must be positive"),
        ("model.n_heads=3", "model.n_heads = 3 does not divide model.dim = 128"),
        ("model.n_kv_heads=3", "model.n_kv_heads = 3 does not divide model.n_heads = 4"),
        ("model.norm=rmsnrm", "unknown norm 'rmsnrm'; did you mean 'rmsnorm'?"),
        ("model.nlayers=2", "unknown key model.nlayers (did you mean 'n_layers'"),
        ("trian.steps=2", "did you mean 'train'?"),
        ("train.schedule=lineer", "train.schedule: unknown schedule 'lineer'"),
        ("train.micro_batch_size=3", "train.micro_batch_size = 3 does not divide train.batch_size = 8"),
        ("model.tie_embeddings=1", "model.tie_embeddings must be bool"),
        (
            "model.positional=learned",
            "train.seq_len = 64 is longer than the learned position table (model.max_seq_len = 32)",
        ),
    ],
)
def test_bad_override_is_one_line_exit_2_and_writes_nothing(cli, tmp_path, override, message):
    code, out, err = cli("train", "tiny", "--set", override, "--set", "model.max_seq_len=32", "--out", tmp_path / "run")
    assert code == 2
    assert err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ('[model]\ndim = 64\nn_layers = "two"\n', "model.n_layers must be int, got 'two'"),
        ("[model\ndim = 64\n", "invalid TOML"),
        ("[modle]\ndim = 64\n", "unknown key 'modle' (did you mean 'model'?)"),
        ("[model]\ndim = 64\nn_layers = 2\nn_heads = 4\n", "missing key model.vocab_size"),
        (TINY_MODEL + "dim_ = 3\n", "unknown key model.dim_ (did you mean 'dim'?)"),
        (TINY_MODEL + 'block = "prenrom"\n', "unknown block 'prenrom'; did you mean 'prenorm'?"),
        (TINY_MODEL + "positional = { interpolate_factor = 2.0 }\n", "inline table needs a string 'name'"),
        ('extends = "sota-2025"\n', "extends = 'sota-2025': unknown recipe 'sota-2025'; did you mean 'sota-2024'"),
        ('extends = "missing.toml"\n', "extends = 'missing.toml': no such file"),
        ('extends = "bad.toml"\n', "extends forms a cycle"),
        (TINY_MODEL + "[train]\nlr = -1.0\n", "train.lr must be positive"),
        (TINY_MODEL + 'positional = { name = "rope", interpolate_factor = 0.5 }\n', "interpolate_factor must be >= 1"),
        (TINY_MODEL + 'attention = { name = "sdpa", no_such_option = 1 }\n', "model.attention = 'sdpa'"),
    ],
)
def test_bad_recipe_file_names_file_and_key(cli, tmp_path, text, message):
    recipe = write(tmp_path / "bad.toml", text)
    code, out, err = cli("train", recipe, "--out", tmp_path / "run")
    assert code == 2, err
    assert err.count("\n") == 1 and message in err and "bad.toml" in err, err
    assert not (tmp_path / "run").exists()


def test_toml_syntax_error_names_line(cli, tmp_path):
    recipe = write(tmp_path / "bad.toml", TINY_MODEL + "n_kv_heads = = 2\n")
    code, _, err = cli("show", recipe)
    assert code == 2 and "line 6" in err, err


def test_unknown_recipe_name_suggests_close_match_in_a_real_process():
    proc = run("train", "sota-2025")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("minsota: error: unknown recipe 'sota-2025'; did you mean 'sota-2024'")


def test_bad_recipe_in_a_real_process_has_no_traceback(tmp_path):
    recipe = write(tmp_path / "bad.toml", TINY_MODEL + "n_kv_heads = 3\n")
    proc = run("train", recipe, "--out", tmp_path / "run")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_extends_inherits_and_overrides_by_name_and_relative_path(tmp_path):
    write(tmp_path / "parent.toml", 'extends = "tiny"\n[model]\nn_layers = 3\n')
    child = write(
        tmp_path / "child.toml",
        'extends = "parent.toml"\n[train]\nsteps = 7\n[model]\npositional = { name = "rope", theta = 500.0 }\n',
    )
    recipe = minsota.load_recipe(child)
    assert recipe.model.n_layers == 3 and recipe.train.steps == 7 and recipe.model.dim == 128  # from tiny
    assert recipe.model.positional == {"name": "rope", "theta": 500.0}  # inline tables replace, not merge
    assert recipe.where("model.n_layers").endswith("parent.toml")


def test_overrides_are_typed_like_the_schema():
    recipe = minsota.load_recipe("tiny", {"model.n_layers": 2, "model.tie_embeddings": True, "train.lr": 1})
    assert recipe.model.n_layers == 2 and recipe.model.tie_embeddings is True
    assert recipe.train.lr == 1.0 and isinstance(recipe.train.lr, float)  # an int is a valid float
    assert recipe.model.n_kv_heads == 2 and recipe.model.head_dim == 32 and recipe.train.micro_batch_size == 8


@pytest.mark.parametrize(
    "text, expected",
    [
        ("model.norm=rmsnorm", ("model.norm", "rmsnorm")),  # a bare word is a string
        ("data.source=/data/c4/*.json.gz", ("data.source", "/data/c4/*.json.gz")),
        ("train.steps=12", ("train.steps", 12)),
        ("train.lr=3e-4", ("train.lr", 3e-4)),
        ("model.tie_embeddings=true", ("model.tie_embeddings", True)),
        (
            'model.positional={ name = "rope", interpolate_factor = 4.0 }',
            ("model.positional", {"name": "rope", "interpolate_factor": 4.0}),
        ),
    ],
)
def test_parse_override(text, expected):
    assert parse_override(text) == expected


def test_numeric_looking_override_of_a_string_key_stays_a_string():
    recipe = minsota.load_recipe("tiny", {"data.text_field": 2024})  # as `--set data.text_field=2024` parses
    assert recipe.data.text_field == "2024"


def test_show_prints_the_resolved_recipe_and_exact_parameters(cli):
    code, out, _ = cli("show", "tiny", "--set", "model.n_layers=2")
    assert code == 0
    resolved = json.loads(out[: out.rindex("}") + 1])
    assert resolved["model"]["n_layers"] == 2 and resolved["loaded_plugins"]["norms"].startswith("minsota")
    model = minsota.build_model(minsota.load_recipe("tiny", {"model.n_layers": 2}), "meta")
    assert f"parameters: {model.num_parameters():,}\n" in out
    assert "FLOPs/token:" in out


@pytest.mark.parametrize("command", ["recipes", "list"])
def test_a_reader_that_stops_early_is_no_error(command):
    """`minsota recipes | head -1`: the pipe's reader goes away; quietly out with 141 (128 + SIGPIPE), as `yes |
    head -1`, not a BrokenPipeError traceback reported as an internal error."""
    process = subprocess.Popen(
        [sys.executable, "-m", "minsota", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    process.stdout.close()  # before it writes a line: every write fails
    _, err = process.communicate(timeout=120)
    assert process.returncode == 141 and err == ""
