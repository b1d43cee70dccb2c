"""Shared test helpers: run the CLI in-process (fast) or as a real subprocess (exit codes, no traceback)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from minsota.cli import main

REPO = Path(__file__).resolve().parents[1]
PLUGINS = REPO / "tests" / "plugins"
# ../shared/data beside the checkout (developer machines and CI); tests needing it skip without it
SHARED_DATA = REPO.parent / "shared" / "data"


def run(*args, env=None, cwd=None, timeout=600):
    """`python -m minsota ARGS` in a subprocess -> CompletedProcess (text)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "minsota", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)


@pytest.fixture
def cli(capsys):
    """Run `minsota ARGS` in-process -> (exit code, stdout, stderr)."""

    def invoke(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return invoke
