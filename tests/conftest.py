"""Shared test helpers: run the CLI in-process (fast) or as a real subprocess (exit codes, no traceback)."""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
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


def python(*args, env=ENV, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python ARGS` in a subprocess (with ENV unless told) -> CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )


def run(*args, env=None, cwd=None, timeout=600):
    """`python -m minsota ARGS` in a subprocess -> CompletedProcess (text)."""
    return python("-m", "minsota", *args, env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout)


def torchrun(*args, script: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 -m minsota ARGS`` (or SCRIPT ARGS), with ENV."""
    target = [script] if script else ["-m", "minsota"]
    return python("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *target, *args, timeout=timeout)


@dataclass
class Job:
    """One command of an `in_turn` launch: its exit status (None: it never finished, and stderr ends with the
    launch's), what it printed (every rank's, rank 0's first) and when it started (time.time())."""

    returncode: int | None
    stdout: str
    stderr: str
    started: float | None


@dataclass
class Launch:
    """What `in_turn` ran: the launch, and each of its jobs."""

    process: subprocess.CompletedProcess  # the launch itself: `python tests/jobs.py` or torchrun
    ended: float  # time.time() when it returned
    jobs: dict[str, Job]
    out: Path  # OUT/NAME/ holds each job's files; jobs that train write OUT/NAME/run by convention

    def run_dir(self, name: str) -> Path:
        """OUT/NAME/run, once the job NAME has exited 0 (else fail with what it printed)."""
        job = self.jobs[name]
        assert job.returncode == 0, job.stderr
        return self.out / name / "run"


def in_turn(jobs: dict[str, dict], out: Path, ranks: int = 1, timeout: float = 600) -> Launch:
    """Run JOBS (name -> {"code": Python first, "argv": minsota's arguments}) in turn in one process (`tests/jobs.py`),
    or with ranks=2 in each rank of one torchrun launch: one start-up for all of them. Their files go to OUT."""
    out.mkdir(parents=True, exist_ok=True)
    argvs = {name: {**job, "argv": job["argv"] and [str(a) for a in job["argv"]]} for name, job in jobs.items()}
    (out / "jobs.json").write_text(json.dumps(argvs))
    script = REPO / "tests" / "jobs.py"
    if ranks == 2:
        process = torchrun(out / "jobs.json", out, script=script, timeout=timeout)
    else:
        process = python(script, out / "jobs.json", out, timeout=timeout)
    ended = time.time()

    def read(name: str, file: str) -> list[str | None]:
        return [(p.read_text() if (p := out / name / f"{rank}.{file}").exists() else None) for rank in range(ranks)]

    done = {}
    for name in jobs:
        codes, started, err = read(name, "code"), read(name, "start")[0], "".join(filter(None, read(name, "err")))
        code = None if None in codes else next((int(c) for c in codes if int(c)), 0)
        if code is None:
            err += (
                f"\n--- {name} never finished; the launch (exit {process.returncode}) ended:\n{process.stderr[-6000:]}"
            )
        done[name] = Job(code, "".join(filter(None, read(name, "out"))), err, started and float(started))
    return Launch(process, ended, done, out)


def copied(source: Path, to: Path, then: str = "") -> str:
    """`in_turn` job code: rank 0 (or the one process) copies the run in job folder SOURCE to job folder TO, then
    runs THEN (`run`: the copy's path), before any rank goes on."""
    return (
        "import os, shutil\n"
        "from pathlib import Path\n"
        "if os.environ.get('RANK', '0') == '0':\n"
        f"    run = Path(shutil.copytree({str(source / 'run')!r}, {str(to / 'run')!r}))\n"
        + "".join(f"    {line}\n" for line in then.splitlines())
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
