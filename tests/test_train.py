"""The trainer on the tiny recipe (CPU, fp32, offline data): schedules, weight-decay groups, accumulation,
the golden loss curve, bit-exact resume after kill -9 and SIGTERM, divergence, disk full, refused changes.

The golden curve is exact on the platforms it was recorded on (torch build, CPU vendor/family/model, the vector
ISA torch dispatches to; thread count does not matter) and within TRACE_RTOL elsewhere: CPU kernels take
vendor- and ISA-specific paths, and torch promises no bit-equality across machines. An intended numerics change
regenerates the curve in the same commit (dropping the other platforms' traces, which it invalidates):
    python tests/test_train.py --update-golden
and on another machine, once the test passes there within tolerance, its own exact trace is added with
    python tests/test_train.py --add-platform
"""

import contextlib
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from minsota import checkpoint
from minsota.cli import main
from minsota.loader import load_recipe
from minsota.model import build_model
from minsota.optim import ROLES, build_schedule, lr_multiplier, param_groups
from minsota.plugins import load_plugins
from minsota.recipe import TrainConfig, parse_override

from conftest import ENV, PLUGINS, losses, records, sets

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "assets" / "losses" / "tiny.json"
GOLDEN_RUN = {"train.steps": 20, "train.eval_batches": 1, "train.sample_tokens": 0}
# Measured on tiny's 20-step trace: an AMD EPYC and an Intel Xeon of this machine kind differ by at most 6.5e-4
# relative (step 4, a loss spike; 19 of 20 steps differ), and forcing MKL and torch's vector kernels down to AVX2
# (MKL_ENABLE_INSTRUCTIONS, ATEN_CPU_CAPABILITY) by 1.8e-4. 3e-3 still fails a real numerics change: RMSNorm eps
# 1e-5 -> 1e-4 moves the trace by 0.12, RoPE theta 10000 -> 10500 by 0.033. A change below the machines' own
# spread (weight decay 0.1 -> 0.11: 2.5e-4) is caught only on a recorded platform, where the trace is exact.
TRACE_RTOL = 3e-3
NAN_PLUGIN = REPO / "tests" / "assets" / "nan_plugin.py"
SHORT = {"train.steps": 8, "train.checkpoint_every": 3, "train.eval_batches": 1, "train.sample_tokens": 0}


def popen(*args, prelude: str = "", **options) -> subprocess.Popen:
    """`minsota ARGS` in a child process, after running ``prelude`` there (to arm a fault). Its stderr goes to a
    file, not a pipe: the data worker of a trainer killed with -9 would hold a pipe open (and a reader waiting)
    until torch's watchdog ends it, ~5 s later."""
    code = f"import sys\n{prelude}\nfrom minsota.cli import main\nsys.exit(main(sys.argv[1:]))"
    err = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        env=ENV,
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=err,
        **options,
    )
    process.err = err
    return process


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    """Once the child has exited: (its exit code, its stderr)."""
    process.wait(timeout=timeout)
    process.err.seek(0)
    return process.returncode, process.err.read()


def wait_for_step(process: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(r.get("step", 0) >= step for r in (records(run_dir) if (run_dir / "metrics.jsonl").exists() else [])):
        assert process.poll() is None, finish(process)
        assert time.monotonic() < deadline, f"no step {step} within {timeout} s"
        time.sleep(0.05)


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Every loss the (interrupted, resumed) run logged, repeats included, equals the reference's bit for bit."""
    expected, got = losses(reference), records(run_dir)
    for record in got:
        if "loss" in record:
            assert record["loss"] == expected[record["step"]], f"step {record['step']}"
    assert {r["step"] for r in got if "loss" in r} == set(expected)
    assert [r for r in got if "val_loss" in r][-1] == [r for r in records(reference) if "val_loss" in r][-1]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted SHORT run (checkpoints at steps 3, 6 and 8), in a child process like the faulty ones."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    code, err = finish(popen("train", "tiny", "--out", run_dir, *sets(SHORT)))
    assert code == 0, err
    return run_dir


@pytest.fixture
def finished_run(reference, tmp_path) -> Path:
    """A copy of the reference run to damage or extend."""
    return Path(shutil.copytree(reference, tmp_path / "run"))


# ------------------------------------------------------------------------------------------ numerics


def lr_at(step: int, t: TrainConfig) -> float:
    """The lr the trainer gives a group of base lr train.lr at ``step``: warmup, then train.schedule."""
    return t.lr * lr_multiplier(step, t, build_schedule(t))


def test_schedules_at_key_steps():
    cosine = TrainConfig(steps=101, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cosine) == pytest.approx(1 / 11)  # the first step already learns
    assert lr_at(9, cosine) == pytest.approx(10 / 11)
    assert lr_at(10, cosine) == 1.0
    assert lr_at(55, cosine) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_at(100, cosine) == pytest.approx(0.1)  # min_lr_ratio·lr on the last step
    assert lr_at(4, TrainConfig(steps=101, lr=1.0, warmup_steps=9, warmup_shape="cosine")) == pytest.approx(0.5)
    assert lr_at(0, TrainConfig(steps=101, lr=1.0, warmup_steps=10, warmup_shape="none")) == 1.0
    assert lr_at(2, TrainConfig(steps=100, lr=1.0, warmup_steps=0.03)) == pytest.approx(3 / 4)  # 3% of 100 steps
    wsd = TrainConfig(steps=100, lr=1.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.1)
    assert lr_at(79, wsd) == 1.0
    assert lr_at(80, wsd) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(1 / 20)))  # 1-sqrt cooldown
    assert lr_at(99, wsd) == pytest.approx(0.1)
    assert lr_at(99, TrainConfig(steps=100, lr=1.0, warmup_steps=10, schedule="constant")) == 1.0
    linear = TrainConfig(steps=101, lr=1.0, warmup_steps=10, schedule={"name": "linear", "min_lr_ratio": 0.0})
    assert lr_at(10, linear) == 1.0 and lr_at(55, linear) == pytest.approx(0.5) and lr_at(100, linear) == 0.0
    inverse = TrainConfig(steps=100, lr=1.0, warmup_steps=4, schedule="inverse-sqrt")
    assert lr_at(3, inverse) == pytest.approx(4 / 5) and lr_at(4, inverse) == 1.0  # continues the ramp's end
    assert lr_at(16, inverse) == pytest.approx(0.5)  # sqrt(4 / 16)


@pytest.mark.parametrize("tie, decay_embeddings", [(False, False), (False, True), (True, False)])
def test_groups_by_role_and_weight_decay_on_matrices_only(tie, decay_embeddings):
    recipe = load_recipe("tiny", {"model.tie_embeddings": tie, "train.decay_embeddings": decay_embeddings})
    model = build_model(recipe, device="meta")
    groups = {g["role"]: g for g in param_groups(model, recipe.train)}
    assert list(groups) == [role for role in ROLES if role != "head" or not tie]
    names = dict(model.named_parameters())
    for g in groups.values():  # names as in named_parameters, beside their tensors
        assert [names[n] for n in g["names"]] == g["params"] and g["lr"] == recipe.train.lr
    embedding = "tok_embeddings.weight"
    assert groups["embedding"]["names"] == [embedding]  # tied, the head is the embedding: listed once
    assert ("head" in groups) == (not tie) and (tie or groups["head"]["names"] == ["output.weight"])
    matrices = {n for n, p in names.items() if p.ndim >= 2} - {embedding, "output.weight"}
    assert set(groups["matrix"]["names"]) == matrices
    assert set(groups["vector"]["names"]) == {n for n, p in names.items() if p.ndim < 2}
    assert "norm.weight" in groups["vector"]["names"] and "layers.0.attention_norm.weight" in groups["vector"]["names"]
    decayed = {role for role, g in groups.items() if g["weight_decay"] == 0.1}
    assert decayed == {"matrix"} | ({"embedding"} if decay_embeddings else set()) | ({"head"} if not tie else set())
    assert groups["vector"]["weight_decay"] == 0.0
    wqkv = groups["matrix"]["names"].index("layers.0.attention.wqkv.weight")
    assert groups["matrix"]["splits"][wqkv] == [128, 64, 64]  # q, k, v: 4 heads, 2 KV heads of 32


def test_param_group_rules_first_match_wins_and_show_prints_them(cli):
    rules = '[{params = ["layers.0.*", "output.*"], lr_scale = 0.5}, {params = ["layers.*"], weight_decay = 0.0}]'
    recipe = load_recipe("tiny", dict([parse_override(f"train.param_groups={rules}")]))
    groups = param_groups(build_model(recipe, device="meta"), recipe.train)
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["layers.0.attention.wqkv.weight"]["lr"] == recipe.train.lr * 0.5
    assert by_name["layers.0.attention.wqkv.weight"]["weight_decay"] == 0.1  # the first rule does not set it
    assert by_name["layers.1.attention.wqkv.weight"]["weight_decay"] == 0.0
    assert by_name["layers.1.attention.wqkv.weight"]["lr"] == recipe.train.lr
    assert by_name["output.weight"]["lr"] == recipe.train.lr * 0.5 and by_name["output.weight"]["role"] == "head"
    code, out, err = cli("show", "tiny", "--set", f"train.param_groups={rules}")
    assert code == 0, err
    table = out[out.index("parameter groups:") :].splitlines()
    assert table[1].split() == ["role", "tensors", "parameters", "lr", "weight_decay", "first"]
    rows = [row.split() for row in table[2:] if row.split() and row.split()[0] in ROLES]
    assert len(rows) == len(groups) and sum(int(row[1]) for row in rows) == len(by_name)
    assert ["matrix", "4", "196,608", "1.5e-03", "0.1", "layers.0.attention.wqkv.weight"] in rows

    code, _, err = cli("train", "tiny", "--set", 'train.param_groups=[{params = ["layers.*.atention.*"]}]')
    assert code == 2 and err.count("\n") == 1
    assert "train.param_groups[0]: params glob 'layers.*.atention.*' matches no parameter" in err


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.optimizer='adamx'", "train.optimizer: unknown optimizer 'adamx'"),
        (
            "train.optimizer={name='muon', lr=0.02, momentun=0.9}",
            "train.optimizer: muon: got an unexpected keyword argument 'momentun'",
        ),
        ("train.schedule='cosin'", "train.schedule: unknown schedule 'cosin'"),
        (
            "train.schedule={name='wsd', decay_fraction=2.0}",
            "train.schedule: wsd: decay_fraction must be in [0, 1], got 2.0",
        ),
        ("train.param_groups=[{params=['x'], lr=3.0}]", "train.param_groups[0]: unknown key 'lr'"),
    ],
)
def test_bad_optimizer_schedule_and_group_rules_are_refused_naming_the_key(cli, override, message):
    code, _, err = cli("show", "tiny", "--set", override)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_accumulation_equals_the_large_batch(tmp_path, cli):
    """4 micro-batches of 2 = 1 batch of 8: the same gradient (norm) on the same weights, the same losses after."""
    runs = {}
    for micro in (8, 2):
        run_dir = tmp_path / f"micro-{micro}"
        code, _, err = cli(
            "train", "tiny", "--out", run_dir, *sets({**GOLDEN_RUN, "train.steps": 3, "train.micro_batch_size": micro})
        )
        assert code == 0, err
        runs[micro] = [(r["loss"], r["grad_norm"]) for r in records(run_dir) if "loss" in r]
    assert list(sum(runs[2], ())) == pytest.approx(list(sum(runs[8], ())), rel=1e-5)


def cpu_platform() -> dict:
    """What a CPU fp32 trace depends on: torch's build, the CPU (vendor, family, model) and the vector ISA torch
    dispatches to. Machines that agree on all of it give the same trace bit for bit."""
    cpu = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            cpu.setdefault(key, value)
    return {
        "torch": torch.__version__,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": " ".join(cpu.get(key, "?") for key in ("vendor_id", "cpu family", "model")),
    }


def golden_curve(tmp_path, cli) -> list[float]:
    code, _, err = cli("train", "tiny", "--out", tmp_path / "run", *sets(GOLDEN_RUN))
    assert code == 0, err
    return [losses(tmp_path / "run")[step] for step in range(1, 21)]


def test_golden_loss_curve_and_learning(tmp_path, cli):
    got = golden_curve(tmp_path, cli)
    val_loss = records(tmp_path / "run")[-1]["val_loss"]
    assert sum(got[-5:]) / 5 < got[0] - 1.5 and val_loss < math.log(256) - 0.5  # it learns
    traces = json.loads(GOLDEN.read_text())["traces"]
    update = "if intended: python tests/test_train.py --update-golden"
    for trace in traces:
        if trace["platform"] == cpu_platform():  # recorded here: exact
            diffs = [(step, e, g) for step, (e, g) in enumerate(zip(trace["losses"], got), 1) if e != g]
            assert not diffs, (
                f"{len(diffs)} of 20 losses differ from {GOLDEN.name} on its own platform, first at "
                f"step {diffs[0][0]}: {diffs[0][1]!r} -> {diffs[0][2]!r} (max abs diff "
                f"{max(abs(e - g) for _, e, g in diffs):.3g}); {update}"
            )
            return
    for trace in traces:  # another machine: within the measured spread of machines
        worst = max(range(20), key=lambda i: abs(got[i] - trace["losses"][i]) / trace["losses"][i])
        rel = abs(got[worst] - trace["losses"][worst]) / trace["losses"][worst]
        assert rel <= TRACE_RTOL, (
            f"step {worst + 1}: loss {got[worst]!r} is {rel:.2g} relative from {GOLDEN.name}'s "
            f"{trace['losses'][worst]!r} (recorded on {trace['platform']}), over the "
            f"{TRACE_RTOL:g} machines differ by; {update}"
        )


def test_compiled_training_matches_eager(tmp_path, cli, reference):
    code, _, err = cli(
        "train", "tiny", "--out", tmp_path / "run", *sets({**SHORT, "train.steps": 2, "train.compile": True})
    )
    assert code == 0, err
    compiled = losses(tmp_path / "run")
    eager = losses(reference)  # a different schedule length changes lr only after warmup: steps 1-2 agree
    assert compiled[1] == pytest.approx(eager[1], rel=1e-5) and compiled[2] == pytest.approx(eager[2], rel=1e-4)


# ------------------------------------------------------------------------------------ interruptions


def kill_at_fsync(n: int, signum: int = signal.SIGKILL) -> str:
    """A child-process prelude: send itself ``signum`` at its n-th fsync (a checkpoint is 8 of them)."""
    return (
        "import os, minsota.checkpoint as c\n"
        f"def fsync(path, real=c._fsync, calls=[0]):\n"
        f"    calls[0] += 1\n"
        f"    if calls[0] == {n}: os.kill(os.getpid(), {int(signum)})\n"
        f"    real(path)\n"
        f"c._fsync = fsync"
    )


def test_kill_9_anywhere_then_resume_is_bit_exact(tmp_path, reference, cli):
    run_dir = tmp_path / "run"
    # fsyncs: 1 recipe.json, then per checkpoint 6 files, its directory and checkpoints/ (2-9 = step 3)
    code, _ = finish(popen("train", "tiny", "--out", run_dir, *sets(SHORT), prelude=kill_at_fsync(11)))
    assert code == -signal.SIGKILL  # inside writing step 6, its optimizer state half done
    assert [p.name for p in checkpoint.checkpoints(run_dir / "checkpoints")] == ["step-3"]
    assert list((run_dir / "checkpoints").glob(".tmp-step-6-*"))

    code, _ = finish(popen("train", "--resume", run_dir, prelude=kill_at_fsync(8)))
    assert code == -signal.SIGKILL  # every file of step 6 synced, killed before the rename
    assert [p.name for p in checkpoint.checkpoints(run_dir / "checkpoints")] == ["step-3"]

    process = popen("train", "--resume", run_dir)
    wait_for_step(process, run_dir, 7)
    process.kill()  # between steps
    assert finish(process)[0] == -signal.SIGKILL

    code, _, err = cli("train", "--resume", run_dir)  # in this process: it has torch imported already
    assert code == 0, err
    assert "resuming at step 6" in err
    assert_same_run(run_dir, reference)
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step-3", "step-6", "step-8"]


@pytest.mark.parametrize("to", ["trainer", "group"])
def test_sigterm_checkpoints_the_step_and_resumes_bit_exact(tmp_path, reference, to, cli):
    """SIGTERM to the trainer alone (kill, torchrun) or to its whole process group, data workers included
    (Slurm's scancel, container stops): either way the step is checkpointed and no worker is left behind."""
    run_dir = tmp_path / "run"
    process = popen("train", "tiny", "--out", run_dir, *sets({**SHORT, "data.num_workers": 2}), start_new_session=True)
    wait_for_step(process, run_dir, 1)
    if to == "group":
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    code, err = finish(process)
    assert code == 143, err
    assert "Traceback" not in err
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)  # the group is empty: the workers ended with the trainer
    stopped = max(losses(run_dir))
    assert stopped < 8 and checkpoint.checkpoints(run_dir / "checkpoints")[-1].name == f"step-{stopped}"
    code, _, err = cli("train", "--resume", run_dir)
    assert code == 0, err
    assert_same_run(run_dir, reference)


def test_second_signal_exits_at_once(tmp_path):
    """SIGINT while checkpointing step 2 (it will checkpoint that step and stop), then SIGINT again: out now."""
    run_dir = tmp_path / "run"
    # fsyncs: 1 recipe.json, 2-9 checkpoint step 1, 10-17 checkpoint step 2
    prelude = kill_at_fsync(11, signal.SIGINT) + "\n" + kill_at_fsync(13, signal.SIGINT)
    code, err = finish(
        popen("train", "tiny", "--out", run_dir, *sets({**SHORT, "train.checkpoint_every": 1}), prelude=prelude)
    )
    assert code == 130 and "second signal: exiting now" in err
    assert [p.name for p in checkpoint.checkpoints(run_dir / "checkpoints")] == ["step-1"]
    checkpoint.verify(run_dir / "checkpoints" / "step-1")


def test_resume_restores_the_rng_with_dropout(tmp_path, cli):
    """Dropout draws from torch's RNG every step: the resumed steps repeat bit for bit only if the RNG state
    saved with the checkpoint is restored (the same seed again would give the masks of step 1 instead)."""
    run_dir = tmp_path / "run"
    dropout = ["--plugin", PLUGINS / "dropout.py", *sets({**SHORT, "model.feedforward": "swiglu-dropout"})]
    code, _, err = cli("train", "tiny", "--out", run_dir, *dropout)
    assert code == 0, err
    uninterrupted, logged = losses(run_dir), len(records(run_dir))
    code, _, err = cli("train", "--resume", run_dir / "checkpoints" / "step-3")
    assert code == 0, err
    again = [r for r in records(run_dir)[logged:] if "loss" in r]
    assert [(r["step"], r["loss"]) for r in again] == [(step, uninterrupted[step]) for step in range(4, 9)]


def test_disk_full_keeps_the_previous_checkpoint(finished_run):
    def limit_file_size():  # files over 4 MB fail with EFBIG (Python ignores SIGXFSZ): the optimizer state does
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))

    process = subprocess.run(
        [sys.executable, "-m", "minsota", "train", "--resume", finished_run, "--set", "train.steps=9"],
        env=ENV,
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
        timeout=120,
    )
    assert process.returncode == 1, process.stderr
    error = process.stderr.strip().splitlines()[-1]
    assert error.startswith("minsota: error: could not write checkpoint") and "step-9" in error
    assert sorted(os.listdir(finished_run / "checkpoints")) == ["step-3", "step-6", "step-8"]
    checkpoint.verify(finished_run / "checkpoints" / "step-8")


# --------------------------------------------------------------------------------- damage, changes


def test_resume_falls_back_past_a_corrupt_checkpoint(finished_run, reference, cli):
    newest = finished_run / "checkpoints" / "step-8" / checkpoint.MODEL
    data = newest.read_bytes()
    newest.write_bytes(data[:5000] + bytes([data[5000] ^ 0x40]) + data[5001:])
    code, _, err = cli("train", "--resume", finished_run / "checkpoints" / "step-8")
    assert code == 2 and err.strip() == f"minsota: error: {newest}: sha256 differs from the manifest (corrupted)"

    code, _, err = cli("train", "--resume", finished_run)
    assert code == 0, err
    assert (
        err.splitlines()[0] == f"minsota: warning: skipping corrupt checkpoint: {newest}: sha256 differs "
        f"from the manifest (corrupted)"
    )
    assert "resuming at step 6" in err
    assert_same_run(finished_run, reference)


def test_resume_refuses_a_changed_batch_size_unless_allowed(finished_run, cli):
    code, _, err = cli("train", "--resume", finished_run, "--set", "train.steps=9", "--set", "train.batch_size=16")
    assert code == 2 and err.count("\n") == 1
    assert "train.batch_size changed from 8 to 16" in err and "--allow-change train.batch_size" in err
    code, _, err = cli(
        "train",
        "--resume",
        finished_run,
        "--set",
        "train.steps=9",
        "--set",
        "train.batch_size=16",
        "--allow-change",
        "train.batch_size",
    )
    assert code == 0, err
    assert records(finished_run)[-2]["tokens"] == 8 * 8 * 64 + 16 * 64


def train_poisoned(cli, run_dir: Path, where: str, overrides: dict | None = None) -> tuple[int, str]:
    """SHORT, checkpointing every step, with NAN_PLUGIN's feed-forward making step 3's ``where`` (loss or grad)
    non-finite -> (exit code, stderr)."""
    poison = f'{{name="poison", at_step=3, where="{where}"}}'
    recipe = {**SHORT, "train.checkpoint_every": 1, "model.feedforward": poison, **(overrides or {})}
    code, _, err = cli("train", "tiny", "--plugin", NAN_PLUGIN, "--out", run_dir, *sets(recipe))
    return code, err


@pytest.mark.parametrize("where, what", [("loss", "loss"), ("grad", "gradient norm")])
def test_non_finite_step_exits_3_with_parameters_untouched(tmp_path, cli, where, what):
    run_dir = tmp_path / "run"
    code, err = train_poisoned(cli, run_dir, where)
    assert code == 3 and err.strip().splitlines()[-1] == (
        f"minsota: error: step 3: non-finite {what}; parameters were not updated (lower train.lr, or let "
        f"train.max_bad_steps skip such steps)"
    )
    assert [p.name for p in checkpoint.checkpoints(run_dir / "checkpoints")] == ["step-1", "step-2"]
    # the live parameters (the poison modules' own, which a NaN step would have hit) are step 2's
    saved = checkpoint.load(run_dir / "checkpoints" / "step-2")["model"]
    plugin = load_plugins([str(NAN_PLUGIN)]).manager.get_plugin("nan_plugin")
    layers = plugin.Poison.instances[-4:]
    for i, layer in enumerate(layers):
        assert torch.equal(layer.w2.weight, saved[f"layers.{i}.feed_forward.w2.weight"])


def test_skipped_step_changes_nothing(tmp_path, cli):
    run_dir = tmp_path / "run"
    code, err = train_poisoned(cli, run_dir, "grad", {"train.steps": 4, "train.max_bad_steps": 1})
    assert code == 0, err
    assert "step 3: non-finite gradient norm, step skipped" in err
    assert records(run_dir)[2] == {"step": 3, "lr": records(run_dir)[2]["lr"], "skipped": "non-finite gradient norm"}
    before, after, later = (checkpoint.load(run_dir / "checkpoints" / f"step-{s}") for s in (2, 3, 4))
    for part in ("model", "optimizer"):
        assert all(torch.equal(before[part][k], after[part][k]) for k in before[part]), part
        assert not all(torch.equal(after[part][k], later[part][k]) for k in after[part]), part


def test_never_checkpoints_a_non_finite_tensor(tmp_path, cli):
    run_dir = tmp_path / "run"
    code, _, err = cli(
        "train", "tiny", "--out", run_dir, *sets({**SHORT, "train.checkpoint_every": 1, "train.lr": 1e39})
    )  # finite, but not in fp32
    assert code == 3 and "step 1: refusing to checkpoint a non-finite tensor" in err
    assert not (run_dir / "checkpoints").exists()


def test_new_run_refuses_an_existing_run_dir(finished_run, cli):
    code, _, err = cli("train", "tiny", "--out", finished_run)
    assert code == 2 and f"--resume {finished_run}" in err


def test_weights_only_checkpoint_starts_a_run_from_those_weights(finished_run, tmp_path, cli):
    """What an imported model looks like: recipe.json and a step-0 checkpoint of weights alone."""
    trained = checkpoint.load(finished_run / "checkpoints" / "step-8")
    run_dir = tmp_path / "imported"
    checkpoint.save(run_dir / "checkpoints", 0, model=trained["model"], recipe=trained["recipe"])
    shutil.copy(finished_run / "recipe.json", run_dir / "recipe.json")
    code, _, err = cli("train", "--resume", run_dir, "--set", "train.steps=2")
    assert code == 0, err
    assert losses(run_dir)[1] < losses(finished_run)[1] - 1.0  # starts where the trained model was


def test_tensorboard_receives_the_metrics(tmp_path, cli):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    code, _, err = cli(
        "train", "tiny", "--out", run_dir, *sets({**SHORT, "train.steps": 2, "train.trackers": '["tensorboard"]'})
    )
    assert code == 0, err
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == sorted(losses(run_dir).items())
    assert {"lr", "grad_norm", "tokens_per_s", "mfu", "val_loss"} <= set(events.Tags()["scalars"])


def test_a_tracker_that_is_not_installed_is_one_line(tmp_path, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    code, _, err = cli("train", "tiny", "--out", tmp_path / "run", *sets({"train.trackers": '["wandb"]'}))
    assert code == 2 and err.strip().splitlines()[-1] == (
        "minsota: error: train.trackers asks for wandb, which is not installed (pip install wandb)"
    )
    assert not (tmp_path / "run").exists()  # refused before anything is written: the same --out works next


# ------------------------------------------------------------------------ one trainer per run, CLI refusals


def test_a_second_trainer_of_a_running_run_exits_2(tmp_path, cli):
    """A double launch, or a requeued job whose predecessor still runs: refused, the run's files untouched."""
    run_dir = tmp_path / "run"
    first = popen(
        "train", "tiny", "--out", run_dir, *sets({**SHORT, "train.steps": 100000, "train.checkpoint_every": 1})
    )
    try:
        wait_for_step(first, run_dir, 2)
        for args, then in [  # the second trainers in this process (a child would spend ~4 s importing torch)
            (("--resume", run_dir), f"let it finish or stop it, then --resume {run_dir}"),
            (("--resume", run_dir / "checkpoints" / "step-1"), f"then --resume {run_dir}"),
            (("tiny", "--out", run_dir), "choose another --out"),
        ]:
            code, _, err = cli("train", *args, *sets({"train.steps": 3}))
            assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
            assert (
                err.startswith(f"minsota: error: {run_dir} is being written by another trainer (pid {first.pid} on ")
                and f"holding {run_dir / '.lock'}" in err
                and then in err
            ), err
        assert first.poll() is None
    finally:
        first.kill()  # kill -9: the kernel releases the lock, though its data worker may outlive it a moment
        finish(first)
    code, _, err = cli("train", "--resume", run_dir, "--set", "train.steps=1")  # at once: the lock is free
    assert code == 0 and "is complete at step" in err, err


def test_resume_refuses_when_every_checkpoint_is_corrupt(finished_run, cli):
    """Not "no checkpoint yet, starting again from step 0": that would silently discard the run."""
    steps = [p.name for p in checkpoint.checkpoints(finished_run / "checkpoints")]
    for name in steps:
        model = finished_run / "checkpoints" / name / checkpoint.MODEL
        model.write_bytes(model.read_bytes()[:-1])
    before = (finished_run / "metrics.jsonl").read_text()
    code, _, err = cli("train", "--resume", finished_run, "--set", "train.steps=9")
    assert code == 2, err
    assert err.splitlines()[-1] == (
        f"minsota: error: {finished_run}: every checkpoint is corrupt ({', '.join(steps)}; see above): "
        f"restore one, or move them out of {finished_run / 'checkpoints'} to start the run again from step 0"
    )
    assert err.count("skipping corrupt checkpoint") == len(steps) and "starting it again" not in err
    assert (finished_run / "metrics.jsonl").read_text() == before
    assert [p.name for p in checkpoint.checkpoints(finished_run / "checkpoints")] == steps


@pytest.mark.parametrize("recipe", ["palm", "nonexistent"])
def test_a_recipe_with_resume_is_refused(finished_run, cli, recipe):
    before = (finished_run / "metrics.jsonl").read_text()
    code, _, err = cli("train", recipe, "--resume", finished_run, "--set", "train.steps=9")
    assert code == 2 and err == (
        f"minsota: error: a recipe ('{recipe}') and --resume are exclusive: --resume "
        f"{finished_run} continues with the run's own recipe.json; change keys with --set\n"
    )
    code, _, err = cli("train", "--resume", finished_run, "--out", finished_run.parent / "elsewhere")
    assert code == 2 and err.count("\n") == 1 and "--out and --resume are exclusive" in err, err
    assert (finished_run / "metrics.jsonl").read_text() == before


def test_an_out_that_cannot_be_a_run_directory_is_one_line(tmp_path, cli):
    (tmp_path / "afile").write_text("keep me")
    code, _, err = cli("train", "tiny", "--out", tmp_path / "afile")
    assert (
        code == 2
        and err == f"minsota: error: {tmp_path / 'afile'}: exists and is not a directory; choose another --out\n"
    )
    code, _, err = cli("train", "tiny", "--out", tmp_path / "afile" / "run")
    assert code == 2 and err.count("\n") == 1 and "cannot create the run directory (Not a directory)" in err, err
    assert (tmp_path / "afile").read_text() == "keep me"


@pytest.mark.parametrize("n", ["-3", "0"])
def test_generate_refuses_max_new_tokens_below_1(tmp_path, cli, n):
    code, _, err = cli("generate", tmp_path / "no-run", "--max-new-tokens", n)
    assert code == 2 and err == f"minsota: error: --max-new-tokens must be at least 1, got {n}\n"


def record_golden(keep_others: bool) -> None:
    """Record this platform's golden trace: alone (an intended numerics change), or beside the others."""
    torch.set_num_threads(1)
    os.environ["TQDM_DISABLE"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        got = golden_curve(Path(tmp), lambda *args: (main([str(a) for a in args]), "", ""))
    traces = []
    if keep_others:
        traces = [t for t in json.loads(GOLDEN.read_text())["traces"] if t["platform"] != cpu_platform()]
        assert all(abs(g - e) <= TRACE_RTOL * e for t in traces for g, e in zip(got, t["losses"])), (
            "this machine is outside TRACE_RTOL of the recorded traces: run the test and read why first"
        )
    traces.append({"platform": cpu_platform(), "threads": 1, "losses": got})
    GOLDEN.write_text(json.dumps({"recipe": "tiny", "overrides": GOLDEN_RUN, "traces": traces}, indent=2) + "\n")
    print(f"wrote {GOLDEN}: {len(traces)} platform(s)")


if __name__ == "__main__" and sys.argv[1:] in (["--update-golden"], ["--add-platform"]):
    record_golden(keep_others=sys.argv[1] == "--add-platform")
