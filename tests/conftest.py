"""Shared test helpers: run the CLI in-process (fast) or as a real subprocess (exit codes, no traceback)."""

import json
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


# Training subprocesses: one thread everywhere, so the golden curve does not depend on the core count and
# two test processes never fight over the cores (OpenMP's spinning turns 0.13 s steps into 1 s under contention).
ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def sets(overrides: dict) -> list[str]:
    """{"train.steps": 3, "train.compile": True} -> ["--set", "train.steps=3", "--set", "train.compile=true"]"""
    return [
        arg
        for key, value in overrides.items()
        for arg in ("--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    ]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def run(*args, env=None, cwd=None, timeout=600):
    """`python -m minsota ARGS` in a subprocess -> CompletedProcess (text)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "minsota", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


@pytest.fixture
def cli(capsys):
    """Run `minsota ARGS` in-process -> (exit code, stdout, stderr)."""

    def invoke(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return invoke


def grad_norms(run_dir: Path) -> dict[int, float]:
    """step -> gradient norm (before clipping): a constant gradient factor that AdamW hides shows here."""
    return {r["step"]: r["grad_norm"] for r in records(run_dir) if "grad_norm" in r}


# A toy Hugging Face decoder config (random init, no download) that the parity tests of every family start from
HF_VOCAB = 101  # an odd vocabulary must survive exactly
HF_TOY = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=HF_VOCAB,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
)
