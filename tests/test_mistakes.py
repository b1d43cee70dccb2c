"""User mistakes that once ended in a traceback (exit 1) or in a wrong message: each is one line naming the thing,
exit 2, and nothing is left behind. Each case stands for its class (every float argument, every path argument)."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from minsota import checkpoint
from minsota.cli import main

from conftest import losses, python, records, sets

RUN = {"train.steps": 2, "train.checkpoint_every": 1, "train.eval_batches": 1, "train.sample_tokens": 0}


def one_line(err: str, *parts: str) -> None:
    assert err.strip().count("\n") == 0 and "Traceback" not in err, err
    for part in parts:
        assert part in err, err


def usage_error(capsys, *args) -> str:
    """An argparse refusal: exit 2, the command's usage, then one error line; returns that line."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny run with checkpoints at steps 1 and 2."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "tiny", "--out", str(run_dir), *sets(RUN)]) == 0
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


# ----------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("command", [["train"], ["show"], ["compare", "tiny"], ["diff", "tiny"]])
def test_a_recipe_that_is_not_utf8(cli, tmp_path, command):
    recipe = tmp_path / "latin1.toml"
    recipe.write_bytes('extends = "tiny"\ndescription = "café"\n'.encode("latin-1"))
    code, _, err = cli(*command, recipe, *(["--out", tmp_path / "out"] if command[0] in ("train", "compare") else []))
    assert code == 2
    one_line(err, str(recipe), "not UTF-8", "0xe9")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["train", "show"])
def test_a_recipe_path_that_is_a_directory(cli, tmp_path, command):
    code, _, err = cli(command, tmp_path)
    assert code == 2
    one_line(err, f"{tmp_path}: is a directory, not a recipe file")


@pytest.mark.parametrize(
    "override",
    [
        "train.lr=nan",
        "train.beta2=inf",
        "model.init_std=-inf",
        "train.eps=nan",
        'model.positional={name="rope", theta=inf}',
        'model.norm={name="rmsnorm", eps=nan}',
    ],
)
def test_non_finite_floats_are_refused_in_every_key(cli, tmp_path, override):
    code, _, err = cli("train", "tiny", "--set", override, "--out", tmp_path / "run")
    assert code == 2
    key = override.split("=")[0] + (f".{override.split(', ')[1].split('=')[0]}" if "{" in override else "")
    one_line(err, f"{key} must be a finite number")
    assert not (tmp_path / "run").exists()


def test_non_finite_float_in_a_recipe_file(cli, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('extends = "tiny"\n[train]\nlr = nan\n')
    code, _, err = cli("show", recipe)
    assert code == 2
    one_line(err, str(recipe), "train.lr must be a finite number, got nan")


# ------------------------------------------------------------------------------------ command-line arguments


@pytest.mark.parametrize(
    "arg", ["--temperature=nan", "--temperature=inf", "--top-p=nan", "--top-p=-inf", "--temperature=warm"]
)
def test_every_float_argument_is_a_finite_number(capsys, tmp_path, arg):
    option, value = arg.split("=")
    line = usage_error(capsys, "generate", tmp_path, arg)
    assert line.startswith(f"minsota generate: error: argument {option}: ") and repr(value) in line


@pytest.mark.parametrize(
    "args",
    [
        ["train", "tiny", "--out", ""],
        ["train", ""],
        ["train", "--resume", ""],
        ["prepare", "corpus.txt", "--tokenizer", "bytes", "--out", ""],
        ["show", " "],
        ["diff", "tiny", ""],
        ["eval", ""],
        ["generate", " "],
        ["compare", "tiny", "tiny", "--out", ""],
        ["export-hf", "RUN", ""],
        ["import-hf", "", "RUN"],
        ["list", "--plugin", ""],
    ],
)
def test_every_path_argument_refuses_an_empty_path(capsys, tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    line = usage_error(capsys, *args)
    assert line.startswith(f"minsota {args[0]}: error: argument ") and line.endswith(": an empty path")
    assert list(tmp_path.iterdir()) == []  # nothing trained into ./runs


def test_an_unknown_option_shows_its_command_s_usage(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--bogus-flag"])
    err = capsys.readouterr().err
    assert err.startswith("usage: minsota train ") and err.strip().endswith(
        "minsota train: error: unrecognized arguments: --bogus-flag"
    )


def test_a_plugin_path_that_is_a_directory(cli, tmp_path):
    code, _, err = cli("list", "--plugin", tmp_path)
    assert code == 2
    one_line(err, f"--plugin {tmp_path}: is a directory")
    (tmp_path / "plugin.txt").write_text("print('hi')\n")
    code, _, err = cli("list", "--plugin", tmp_path / "plugin.txt")
    assert code == 2
    one_line(err, f"--plugin {tmp_path / 'plugin.txt'}: not a Python file")


def test_allow_change_must_name_a_key_and_go_with_resume(cli, run_copy, tmp_path):
    code, _, err = cli("train", "--resume", run_copy, "--set", "train.steps=3", "--allow-change", "model.bogus")
    assert code == 2
    one_line(err, "--allow-change model.bogus: no such recipe key")
    code, _, err = cli("train", "--resume", run_copy, "--set", "train.steps=3", "--allow-change", "modle")
    assert code == 2 and "did you mean 'model'?" in err
    assert max(losses(run_copy)) == 2  # refused before training
    code, _, err = cli("train", "tiny", "--out", tmp_path / "new", "--allow-change", "model")
    assert code == 2
    one_line(err, "--allow-change applies to --resume only")
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------------ data


@pytest.mark.parametrize("bad", ["empty directory", "other json", "missing"])
def test_a_tokenizer_path_that_is_not_a_tokenizer(cli, tmp_path, trained, bad):
    path = tmp_path / {"empty directory": "tok", "other json": "config.json", "missing": "nowhere"}[bad]
    if bad == "empty directory":
        path.mkdir()
    elif bad == "other json":
        path.write_text('{"model_type": "llama"}')
    expected = "no such file or directory" if bad == "missing" else "is not a tokenizer"
    for args in (["train", "tiny", "--out", tmp_path / "run"], ["eval", trained]):
        code, _, err = cli(*args, "--set", f"data.tokenizer={path}")
        assert code == 2, err
        one_line(err, f"data.tokenizer = '{path}'", expected)
        assert "hub" not in err
    assert not (tmp_path / "run").exists()


def test_a_directory_of_unsupported_files_as_source(cli, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "table.csv").write_text("a,b\n1,2\n")
    code, _, err = cli("train", "tiny", "--set", f"data.source={tmp_path / 'data'}", "--out", tmp_path / "run")
    assert code == 2
    one_line(err, "holds no file of a supported type (*.txt, *.jsonl, *.json, *.parquet")


# ----------------------------------------------------------------------------------------------- checkpoints


def rewrite_with_manifest(path: Path, data: bytes) -> None:
    """Replace a checkpoint file and record it in the manifest, as a faulty writer would: the sums match."""
    path.write_bytes(data)
    manifest_path = path.parent / checkpoint.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][path.name] = {"bytes": len(data), "sha256": checkpoint._sha256(path)}
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "name, data",
    [
        (checkpoint.MODEL, b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all"),
        (checkpoint.OPTIMIZER, b"garbage"),
        (checkpoint.TRAINER, b"{step: 2"),
    ],
)
def test_a_checkpoint_that_matches_its_manifest_but_cannot_be_read(cli, run_copy, name, data):
    newest = run_copy / "checkpoints" / "step-2"
    rewrite_with_manifest(newest / name, data)
    code, _, err = cli("eval", newest)
    assert code == 2
    one_line(err, f"{newest / name}: matches the manifest but cannot be read")
    code, out, err = cli("eval", run_copy)  # the run: its newest readable checkpoint, with a warning
    assert code == 0 and "step:        1" in out and "skipping corrupt checkpoint" in err
    logged = len(records(run_copy))
    code, _, err = cli("train", "--resume", run_copy)
    assert code == 0, err
    assert "skipping corrupt checkpoint" in err and "resuming at step 1" in err
    assert [r["step"] for r in records(run_copy)[logged:] if "loss" in r] == [2]


def test_eval_names_the_first_weight_that_does_not_fit(cli, trained):
    code, _, err = cli("eval", trained, "--set", "model.dim=64")
    assert code == 2
    one_line(err, "does not fit this model", "size mismatch for tok_embeddings.weight")


# ----------------------------------------------------------------------------------------------- Ctrl-C


def interrupted(*args, prelude: str) -> subprocess.CompletedProcess:
    code = f"import sys\n{prelude}\nfrom minsota.cli import main\nsys.exit(main(sys.argv[1:]))"
    return python("-c", code, *args, timeout=120)


# SIGINT to itself at the end of start-up: after recipe.json is written, before the first step
SIGINT_AT_START = (
    "import os, signal, minsota.train as t\nreal = t.build_model\n"
    "def build(*a):\n    os.kill(os.getpid(), signal.SIGINT)\n    return real(*a)\n"
    "t.build_model = build"
)


def test_ctrl_c_during_start_up_of_a_new_run_leaves_nothing(cli, tmp_path):
    run_dir = tmp_path / "run"
    process = interrupted("train", "tiny", "--out", run_dir, *sets(RUN), prelude=SIGINT_AT_START)
    assert process.returncode == 130
    one_line(process.stderr, "minsota: interrupted: during start-up", "the new run left nothing behind")
    assert not run_dir.exists()
    code, _, err = cli("train", "tiny", "--out", run_dir, *sets(RUN))
    assert code == 0, err  # the same --out is not refused


def test_ctrl_c_during_start_up_of_a_resume_leaves_the_run_as_it_was(run_copy):
    before = {p.relative_to(run_copy): p.read_bytes() for p in run_copy.rglob("*") if p.is_file() and p.name != ".lock"}
    process = interrupted("train", "--resume", run_copy, "--set", "train.steps=3", prelude=SIGINT_AT_START)
    assert process.returncode == 130
    one_line(
        process.stderr.replace("minsota: resuming with train.steps 2 -> 3\n", ""),
        f"{run_copy} is unchanged: continue it with minsota train --resume {run_copy}",
    )
    after = {p.relative_to(run_copy): p.read_bytes() for p in run_copy.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after.keys() == before.keys() and all(after[k] == before[k] for k in before if k.name != "recipe.json")


def test_ctrl_c_while_importing_is_one_line():
    """The CLI imports torch inside its error handling (`import minsota.cli` does not import it)."""
    process = interrupted(
        "train",
        "tiny",
        prelude=(
            "class Interrupt:\n    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch':\n            raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, Interrupt())"
        ),
    )
    assert process.returncode == 130
    one_line(process.stderr, "minsota: interrupted")
    imported = python("-c", "import sys, minsota.cli; print('torch' in sys.modules)", timeout=60)
    assert imported.stdout.strip() == "False", imported.stderr
