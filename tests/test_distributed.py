"""Data-parallel training under torchrun, 2 CPU processes over gloo: DDP and FSDP2 match one process on the
same global batch, write the single-process checkpoint format, resume exactly, and a dying rank ends the job."""

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from minsota import checkpoint
from minsota.distributed import init_distributed
from minsota.errors import UserError
from minsota.loader import load_recipe

from conftest import Launch, copied, grad_norms, in_turn, losses, records, sets

# 8 sequences per step: 2 micro-batches of 4 in one process, one per rank in two
RUN = {
    "train.steps": 6,
    "train.micro_batch_size": 4,
    "train.checkpoint_every": 3,
    "train.eval_batches": 2,
    "train.sample_tokens": 0,
}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Launch:
    """The one-process runs the ranks are compared with, in turn in one process: the stream prepared (`minsota
    prepare`: stdlib's first ~300k tokens, read per rank), AdamW's run and each optimizer's (OPTIMIZED)."""
    out = tmp_path_factory.mktemp("one")
    prepare = ["prepare", "stdlib", "--tokenizer", "bytes", "--recipe", "tiny", "--max-tokens", 300_000]
    jobs = {
        "stdlib": {"argv": [*prepare, "--out", out / "stdlib" / "run"]},
        "single": {"argv": train(out / "single", RUN)},
    }
    for name, _, overrides, _ in OPTIMIZED:  # once for its DDP and FSDP2 cases, which share the name and overrides
        job = {"argv": train(out / name, short(overrides))}
        assert jobs.setdefault(name, job) == job, f"{name}: its cases differ in their overrides"
    return in_turn(jobs, out)


@pytest.fixture(scope="module")
def two_ranks(one_process, tmp_path_factory) -> Launch:
    """Every 2-rank run of this file in one torchrun launch (each launch costs ~10 s of start-up), in turn: the
    resumes just after the runs they continue (from a copy, taken by rank 0), the ones that patch the trainer last,
    the dying rank at the very end."""
    out = tmp_path_factory.mktemp("two")
    ddp, fsdp = {**RUN, "train.parallelism": "ddp"}, {**RUN, "train.parallelism": "fsdp"}
    jobs = {
        "ddp": {"argv": train(out / "ddp", ddp)},
        "ddp-resumed": {
            "code": copied(out / "ddp", out / "ddp-resumed"),
            "argv": ["train", "--resume", out / "ddp-resumed" / "run" / "checkpoints" / "step-3"],
        },
        "fsdp": {"argv": train(out / "fsdp", {**fsdp, "data.source": one_process.run_dir("stdlib")})},
    }
    for parallelism, overrides in (("ddp", ddp), ("fsdp", fsdp)):
        compiled = {**overrides, "train.compile": True, "train.checkpoint_every": 0}
        jobs[f"compiled-{parallelism}"] = {"argv": train(out / f"compiled-{parallelism}", compiled)}
    for name, parallelism, overrides, _ in OPTIMIZED:
        checkpoints = 2 if (name, parallelism) == RESUMES else 0
        overrides = {**short(overrides), "train.parallelism": parallelism, "train.checkpoint_every": checkpoints}
        jobs[f"{name}-{parallelism}"] = {"argv": train(out / f"{name}-{parallelism}", overrides)}
    jobs["muon-fsdp-resumed"] = {
        "code": copied(out / "muon-fsdp", out / "muon-fsdp-resumed"),
        "argv": ["train", "--resume", out / "muon-fsdp-resumed" / "run" / "checkpoints" / "step-2"],
    }
    jobs["meta"] = {"code": META, "argv": None}
    jobs["fsdp-resumed"] = {  # step 6's weights damaged unseen by size; every rank says what it reads and hashes
        "code": copied(out / "fsdp", out / "fsdp-resumed", then=DAMAGE) + READS,  # (its spy stays for "dies")
        "argv": ["train", "--resume", out / "fsdp-resumed" / "run"],
    }
    jobs["dies"] = {"code": DIES, "argv": train(out / "dies", ddp)}
    return in_turn(jobs, out, ranks=2)


def train(out: Path, overrides: dict) -> list:
    return ["train", "tiny", "--out", out / "run", *sets(overrides)]


DAMAGE = (
    "model = run / 'checkpoints' / 'step-6' / 'model.safetensors'\n"
    "data = model.read_bytes()\n"
    "model.write_bytes(data[:100] + bytes([data[100] ^ 0x01]) + data[101:])\n"
)  # one bit of step 6's weights flipped: the manifest's sizes still match

READS = (
    "import os, sys\n"
    "import minsota.checkpoint as checkpoint\n"
    "def spy(verb, real):\n"
    "    def call(path):\n"
    "        print(f'rank {os.environ[\"RANK\"]} {verb} {path.name}', file=sys.stderr)\n"
    "        return real(path)\n"
    "    return call\n"
    "checkpoint.load_weights = spy('reads', checkpoint.load_weights)\n"
    "checkpoint._sha256 = spy('hashes', checkpoint._sha256)\n"
)  # the trainer says which files each rank reads and hashes


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_ranks_match_one_and_resume_exactly(one_process, two_ranks, cli, tmp_path, parallelism):
    """DDP on the stream and FSDP2 on the stream prepared (each rank reads its own windows; the global batches stay
    the stream's) match one process streaming, write its checkpoint format and resume exactly: from a named
    checkpoint (DDP), from the run directory past a damaged checkpoint (FSDP2: rank 0 alone reads and hashes the
    weights and optimizer state, and the other rank follows its choice), and at another world size (FSDP2)."""
    single, run_dir = one_process.run_dir("single"), two_ranks.run_dir(parallelism)
    one, two, written = losses(single), losses(run_dir), len(records(run_dir))
    assert two == pytest.approx(one, rel=1e-4)
    assert grad_norms(run_dir) == pytest.approx(grad_norms(single), rel=1e-4)  # averaged over ranks, not summed
    assert [r["val_loss"] for r in records(run_dir) if "val_loss" in r] == pytest.approx(
        [r["val_loss"] for r in records(single) if "val_loss" in r], rel=1e-4
    )
    assert written == len(records(single))  # rank 0 alone writes metrics

    # full tensors in the single-process format, whatever the sharding
    gathered = checkpoint.load(run_dir / "checkpoints" / "step-6")
    alone = checkpoint.load(single / "checkpoints" / "step-6")
    for part in ("model", "optimizer"):
        assert {k: v.shape for k, v in gathered[part].items()} == {k: v.shape for k, v in alone[part].items()}

    if parallelism == "fsdp":  # at another world size: one process (this one) continues the sharded run
        alone_dir = Path(shutil.copytree(run_dir, tmp_path / "alone"))
        code, _, err = cli("train", "--resume", alone_dir / "checkpoints" / "step-3")
        assert code == 0, err
        tail = [r for r in records(alone_dir)[written:] if "loss" in r]
        assert [r["loss"] for r in tail] == pytest.approx([one[step] for step in (4, 5, 6)], rel=1e-4)
        assert [r["grad_norm"] for r in tail] == pytest.approx([grad_norms(single)[s] for s in (4, 5, 6)], rel=1e-4)

    # from step 3 again (a copy of the run): at the same world size, steps 4-6 repeat bit for bit; DDP from the
    # named checkpoint, FSDP2 from the run directory, whose step 6 is damaged: rank 0 falls back to step 3, and
    # rank 1 never hashes it
    resumed, process = two_ranks.run_dir(f"{parallelism}-resumed"), two_ranks.jobs[f"{parallelism}-resumed"]
    again = [r for r in records(resumed)[written:] if "loss" in r]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in again] == [
        (step, two[step], grad_norms(run_dir)[step]) for step in (4, 5, 6)
    ]
    if parallelism == "fsdp":
        assert process.stderr.count("skipping corrupt checkpoint") == 1 and "step-6/model.safetensors" in process.stderr
        for verb in ("reads", "hashes"):
            assert f"rank 0 {verb} model.safetensors" in process.stderr and f"rank 0 {verb} optimizer" in process.stderr
            assert f"rank 1 {verb} model" not in process.stderr and f"rank 1 {verb} optimizer" not in process.stderr
        assert "rank 1 hashes trainer.json" in process.stderr  # what it reads itself


# Every built-in optimizer under DDP and FSDP2 (AdamW: above; Muon gathers each matrix whole). Gradient norms
# within 1e-4, but 1e-3 for Muon's default bf16 Newton-Schulz on FSDP2. Measured (4 steps, relative to 1 rank):
# FSDP2's reduce-scatter leaves a 2.2e-7 difference in the first step's gradient norm, before any update, for
# every optimizer; bf16's rounding of the Newton-Schulz input (2^-9) amplifies it to 5e-5, 2.3e-4, 2.7e-4 at
# steps 2-4 (6.7e-4 at most with train.grad_clip = 0: the gradients differ, not the clip factor), and the same run
# with ns_dtype = "float32" stays within 3.7e-7 (DDP: bit-identical either way).
OPTIMIZED = [
    ("muon", "ddp", {"train.optimizer": "muon"}, 1e-4),
    ("muon", "fsdp", {"train.optimizer": "muon"}, 1e-3),
    ("muon-fp32", "fsdp", {"train.optimizer": "{name='muon', ns_dtype='float32'}"}, 1e-4),
    ("lion", "ddp", {"train.optimizer": "lion"}, 1e-4),
    ("lion", "fsdp", {"train.optimizer": "lion"}, 1e-4),
    ("schedulefree-adamw", "ddp", {"train.optimizer": "schedulefree-adamw", "train.schedule": "constant"}, 1e-4),
    ("schedulefree-adamw", "fsdp", {"train.optimizer": "schedulefree-adamw", "train.schedule": "constant"}, 1e-4),
]
RESUMES = ("muon", "fsdp")  # Muon's sharded run resumes too


def short(overrides: dict) -> dict:
    return {**RUN, "train.steps": 4, "train.checkpoint_every": 0, **overrides}


@pytest.mark.parametrize(
    "name, parallelism, overrides, norm_tolerance", OPTIMIZED, ids=[f"{o[0]}-{o[1]}" for o in OPTIMIZED]
)
def test_two_ranks_match_one_per_optimizer(one_process, two_ranks, name, parallelism, overrides, norm_tolerance):
    """The 2-rank run's losses (within 1e-4) and gradient norms are the 1-rank run's, for each optimizer; Muon's
    sharded run resumes bit for bit (its state: the sharded momentum, and AdamW's for the other roles)."""
    alone, ranks = one_process.run_dir(name), two_ranks.run_dir(f"{name}-{parallelism}")
    assert losses(ranks) == pytest.approx(losses(alone), rel=1e-4)
    assert grad_norms(ranks) == pytest.approx(grad_norms(alone), rel=norm_tolerance)
    if (name, parallelism) == RESUMES:  # from a copy of the run, at step 2
        uninterrupted = [r for r in records(ranks) if "loss" in r and r["step"] > 2]
        again = [r for r in records(two_ranks.run_dir("muon-fsdp-resumed"))[len(records(ranks)) :] if "loss" in r]
        assert [(r["step"], r["loss"], r["grad_norm"]) for r in again] == [
            (r["step"], r["loss"], r["grad_norm"]) for r in uninterrupted
        ]


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_compiled_ranks_match_one(one_process, two_ranks, parallelism):
    """train.compile under DDP (dynamo splits the graph at its gradient buckets) and FSDP2 (each block compiled on
    its own, outside FSDP2's hooks)."""
    single, run_dir = one_process.run_dir("single"), two_ranks.run_dir(f"compiled-{parallelism}")
    assert losses(run_dir) == pytest.approx(losses(single), rel=1e-4)
    # compiled kernels fuse and reorder the sums: gradient norms agreed within 3.3e-4 here (FSDP2, step 4), the
    # losses within 1e-4; a gradient summed over ranks rather than averaged is off by 100%
    assert grad_norms(run_dir) == pytest.approx(grad_norms(single), rel=1e-3)


DIES = (
    "import os, signal\n"
    "import minsota.train\n"
    "def lr_multiplier(step, t, schedule, real=minsota.train.lr_multiplier):\n"
    "    if step == 3 and os.environ['RANK'] == '1':\n"
    "        os.kill(os.getpid(), signal.SIGKILL)\n"
    "    return real(step, t, schedule)\n"
    "minsota.train.lr_multiplier = lr_multiplier\n"
)


def test_a_rank_that_dies_ends_the_job(two_ranks):
    """Rank 1 is killed (SIGKILL, no goodbye) as it starts step 4: torchrun stops the job and names it."""
    dies, process = two_ranks.jobs["dies"], two_ranks.process
    assert dies.started is not None and dies.returncode is None, dies.stderr  # it began, and never ended
    assert process.returncode != 0 and two_ranks.ended - dies.started < 90
    assert "Root Cause" in process.stderr and "rank      : 1" in process.stderr and "SIGKILL" in process.stderr
    assert max(losses(two_ranks.out / "dies" / "run")) == 3


META = (
    "import torch, torch.distributed as dist\n"
    "from minsota.distributed import build_device, parallelize\n"
    "from minsota.loader import load_recipe\n"
    "from minsota.model import build_model\n"
    "recipe = load_recipe('tiny')\n"
    "torch.manual_seed(0)\n"
    "model = build_model(recipe, build_device('fsdp'))\n"
    "assert all(p.is_meta for p in model.parameters()) == (dist.get_rank() == 1)\n"
    "parallelize(model, 'fsdp', None, torch.device('cpu'))\n"
    "from torch.distributed.fsdp import FSDPModule\n"
    "units = [m for m in model.modules() if isinstance(m, FSDPModule)]\n"
    "assert units == [model, *model.layers], units  # one unit per block, then the root\n"
    "torch.manual_seed(0)\n"
    "alone = build_model(recipe, 'cpu')\n"
    "for (name, p), q in zip(model.named_parameters(), alone.parameters()):\n"
    "    assert torch.equal(p.full_tensor(), q), name\n"
    "for (name, b), c in zip(model.named_buffers(), alone.buffers()):\n"
    "    assert torch.equal(b, c), name\n"
    "print(f'rank {dist.get_rank()} ok')\n"
)


def test_fsdp_ranks_build_on_meta_and_receive_rank_zeros_weights(two_ranks):
    """Rank 1 allocates no full weight: it builds on meta, and its shards hold exactly one process's init; each
    block is one FSDP2 unit."""
    meta = two_ranks.jobs["meta"]
    assert meta.returncode == 0, meta.stderr
    assert "rank 0 ok" in meta.stdout and "rank 1 ok" in meta.stdout


def test_a_process_group_the_host_joined_is_kept_only_if_it_fits(monkeypatch):
    """A process that joined a group before training (a notebook, tests/jobs.py) keeps it when its size and
    backend are the launch's; another one is refused in one line rather than trained on."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(UserError, match="already joined a process group of 1 gloo ranks.*needs 2 gloo ranks"):
            init_distributed(load_recipe("tiny", {"train.parallelism": "ddp"}), torch.device("cpu"))
    finally:
        dist.destroy_process_group()
