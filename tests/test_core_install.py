"""Packaging, tested the way users install: a non-editable `pip install .` into a fresh virtual
environment finds every built-in plugin and recipe under the minsota namespace (no top-level `plugins`
or `recipes`), and the example third-party plugin, installed as its own distribution, is discovered
through its entry point and trains by name with no minsota file changed."""

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import minsota

from conftest import PLUGINS, REPO


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", root], check=True)
    python = root / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # torch & co. come from this environment (a second 200 MB torch install would only cost time)
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # build the example from a copy: an in-tree build would leave egg-info that other tests could discover
    example = shutil.copytree(PLUGINS / "minsota-example", root / "src" / "minsota-example")
    for project in (REPO, example):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "--python",
                python,
                "install",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                project,
            ],
            check=True,
            capture_output=True,
        )
    return python, site


def minsota_in(venv, *args, cwd):
    python, _ = venv
    return subprocess.run([python, "-m", "minsota", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def test_non_editable_install_has_every_builtin_under_the_minsota_namespace(venv, tmp_path):
    python, site = venv
    assert (site / "minsota" / "builtins" / "norms.py").is_file()
    assert (site / "minsota" / "recipes" / "sota-2024.toml").is_file()
    assert not (site / "plugins").exists() and not (site / "recipes").exists()
    where = subprocess.run(
        [python, "-c", "import minsota; print(minsota.__file__)"], capture_output=True, text=True, cwd=tmp_path
    ).stdout
    assert where.startswith(str(site)), where  # the installed copy, not this checkout
    proc = minsota_in(venv, "recipes", cwd=tmp_path)
    shipped = {p.stem for p in (REPO / "recipes").glob("*.toml")}
    assert proc.returncode == 0 and shipped <= {line.split()[0] for line in proc.stdout.splitlines()}
    proc = minsota_in(venv, "list", cwd=tmp_path)
    here = {(k, n) for k in ("norm", "attention", "block") for n in minsota.load_plugins().registry(k).list()}
    assert here <= {tuple(line.split()[:2]) for line in proc.stdout.splitlines()}


def test_third_party_plugin_is_discovered_attributed_and_trains(venv, tmp_path):
    proc = minsota_in(venv, "plugins", cwd=tmp_path)
    assert any(line.split()[:3] == ["example", "minsota-example", "0.2.0"] for line in proc.stdout.splitlines())
    proc = minsota_in(venv, "list", "feedforward", cwd=tmp_path)
    assert "bilinear" in proc.stdout and "example" in proc.stdout
    run_dir = tmp_path / "run"
    proc = minsota_in(
        venv,
        "train",
        "tiny-example",
        "--set",
        "train.steps=3",
        "--set",
        "train.sample_tokens=0",
        "--out",
        run_dir,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    recipe = json.loads((run_dir / "recipe.json").read_text())
    assert recipe["model"]["norm"] == "scalenorm" and recipe["loaded_plugins"]["example"] == "minsota-example 0.2.0"
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2, 3]


def test_autoload_switch_keeps_builtins_only(venv, tmp_path):
    python, _ = venv
    proc = subprocess.run(
        [python, "-m", "minsota", "list", "feedforward"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"MINSOTA_DISABLE_PLUGIN_AUTOLOAD": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0 and "swiglu" in proc.stdout and "bilinear" not in proc.stdout
