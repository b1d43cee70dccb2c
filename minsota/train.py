"""The trainer: one loop a reader follows top to bottom (nanoGPT's train.py is the bar for legibility).

`train(recipe, run_dir)` builds the model, AdamW and the data from a resolved recipe and runs
`train.steps` optimizer steps of `train.batch_size` sequences each (gradient accumulation over
micro-batches). Every step appends one JSON line to RUN_DIR/metrics.jsonl; every `eval_every` steps and at
the end the validation loss is measured; every `checkpoint_every` steps and at the end a checkpoint is
written (minsota.checkpoint); at the end the model samples a little text (minsota.inference).

Optimization, every number a recipe key: AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101) with
β = (0.9, 0.95) and weight decay on matrices only, never norms, gains or biases (GPT-3, Llama); gradient
clipping at 1.0; warmup (linear, cosine or none), then cosine decay to 10% of peak (Chinchilla, Hoffmann et
al. 2022, arXiv:2203.15556) or warmup-stable-decay (Hu et al. 2024, arXiv:2404.06395) with the 1-sqrt
cooldown of Hägele et al. 2024 (arXiv:2405.18392), or constant. bf16 autocast and TF32 matmuls on CUDA;
fp32 on CPU, where bf16 is emulated and 2.4-3.9x slower; fp16 brings a dynamic loss scaler.

Faults: the first SIGINT/SIGTERM lets the step finish, checkpoints it and exits 130/143; a second exits at
once. A non-finite loss or gradient norm is caught before `optimizer.step()`, so parameters stay untouched:
the step is skipped (up to `max_bad_steps` times), then training stops with exit 3. One trainer at a time writes
a run directory (its lock, RUN_DIR/.lock); a second one exits 2 naming the holder. `--resume` restores
weights, AdamW state, RNG states and the data position, so on CPU fp32 the resumed losses equal an
uninterrupted run's bit for bit.
"""

import contextlib
import functools
import hashlib
import importlib.util
import itertools
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from minsota import checkpoint
from minsota.data import build_batches, build_tokenizer
from minsota.errors import DivergedError, UserError
from minsota.inference import generate
from minsota.model import build_model
from minsota.recipe import Recipe, TrainConfig, read_recipe_json

# Keys a resumed run may not change unnoticed: they change what the weights mean or what the saved data
# position points at. `--allow-change KEY` (or a whole table, `--allow-change model`) accepts a change.
GUARDED = ("model", "data.source", "data.tokenizer", "data.text_field", "data.holdout_every", "train.batch_size",
           "train.seq_len")
# State dicts by parameter path with whole tensors (FSDP2 shards gathered): to save, on rank 0's CPU only;
# to load, every rank holds them all
TO_SAVE = StateDictOptions(full_state_dict=True, cpu_offload=True)
TO_LOAD = StateDictOptions(full_state_dict=True)


# ------------------------------------------------------------------------------------------ schedule


def warmup_steps(t: TrainConfig) -> int:
    if t.warmup_shape == "none":
        return 0
    return t.warmup_steps if isinstance(t.warmup_steps, int) else round(t.warmup_steps * t.steps)


def lr_at(step: int, t: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based)."""
    warmup, min_lr = warmup_steps(t), t.min_lr_ratio * t.lr
    if step < warmup:
        ramp = (step + 1) / (warmup + 1)  # never 0: the first step already learns (nanoGPT)
        return t.lr * (ramp if t.warmup_shape == "linear" else 0.5 * (1 - math.cos(math.pi * ramp)))
    if t.schedule == "cosine":  # reaches min_lr on the last step
        progress = (step - warmup) / max(1, t.steps - 1 - warmup)
        return min_lr + (t.lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = t.steps - round(t.decay_fraction * t.steps)
    if t.schedule == "wsd" and step >= decay_start:  # 1-sqrt cooldown, min_lr on the last step
        progress = (step - decay_start + 1) / (t.steps - decay_start)
        return min_lr + (t.lr - min_lr) * (1 - math.sqrt(progress))
    return t.lr


def param_groups(model: nn.Module, t: TrainConfig) -> list[dict]:
    """AdamW groups: weight decay on matrices (embeddings only if the recipe says), none on vectors."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # each tensor once, tied weights included
        matrix = p.ndim >= 2 and (t.decay_embeddings or id(p) not in embeddings)
        (decay if matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------------------------- device, numerics


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"train.device = '{name}': not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device = '{name}': CUDA is not available here")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. Weights and optimizer state stay fp32 either way."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def init_distributed(recipe: Recipe) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on CUDA,
    gloo on CPU. One process runs alone whatever train.parallelism says."""
    t, world = recipe.train, int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(t.device)
    if world == 1:
        return 0, 1, device
    if t.parallelism == "none":
        raise UserError(f"{recipe.where('train.parallelism')}: launched as {world} processes but train.parallelism "
                        f"= none: set train.parallelism=ddp or fsdp")
    if t.parallelism == "fsdp" and t.precision == "fp16":
        raise UserError(f"{recipe.where('train.precision')}: fp16 with fsdp is not supported (its loss scaler would "
                        f"need sharding): use bf16")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dist.barrier()  # every rank has checked the run directory before rank 0 writes to it
    return dist.get_rank(), world, device


class LossAsForward(nn.Module):
    """DDP synchronises gradients through hooks around ``forward``, but `Decoder.loss` bypasses
    `Decoder.forward` (it never materialises the logits); DDP wraps this module, whose forward is the loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args):
        return self.model.losses(*args)


def parallelize(model: nn.Module, parallelism: str, dtype: torch.dtype | None):
    """The module or function computing the training loss: `model.loss` itself, through DDP, or on a model
    sharded by FSDP2 (Zhao et al. 2023, arXiv:2304.11277; weights gathered per unit for compute).

    FSDP2's units are each block's components (attention, feed-forward, norms), then the rest, not whole
    blocks: FSDP2 finds the tensors to hook for backward in dicts, lists and dataclasses, never inside the
    TensorDict a block returns, while components are plain tensor -> tensor modules (minsota.state).
    """
    if not dist.is_initialized():
        return model.losses
    if parallelism == "ddp":
        return DistributedDataParallel(LossAsForward(model))
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    for layer in model.layers:
        for component in layer.children():
            if list(component.parameters()):
                fully_shard(component, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    register_fsdp_forward_method(model, "losses")  # gather the embeddings and head around it as around forward
    return model.losses


def gradient_sync(loss_module, model: nn.Module, enabled: bool):
    """Data parallel: all-reduce gradients on a step's last micro-batch only (DDP's no_sync, FSDP2's
    set_requires_gradient_sync)."""
    if isinstance(loss_module, DistributedDataParallel) and not enabled:
        return loss_module.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over all ranks (itself in one process)."""
    if not dist.is_initialized():
        return value
    value = value / dist.get_world_size()
    dist.all_reduce(value)
    return value


@functools.cache
def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul here, measured once per process: the denominator of MFU.

    Measured rather than taken from a datasheet, so it works on any CPU or GPU; MFU is then the fraction
    of what this device's GEMM really reaches (a datasheet peak, as in PaLM's MFU, gives a lower figure).
    """
    n, reps = (4096, 20) if device.type == "cuda" else (1024, 8)
    a = torch.full((n, n), 0.5, device=device, dtype=dtype)  # no RNG: measuring must not shift training
    for _ in range(2):
        a @ a
    best = math.inf
    for _ in range(3):  # the fastest of three: a rate measured while others load the machine is too low
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * reps / best


# ------------------------------------------------------------------------------------- steps, state


def micro_loss(loss_fn, batch: dict, device: torch.device, document: bool):
    """``loss_fn`` (`Decoder.losses`, maybe wrapped) on one micro-batch. Document ids go
    to the model only under document packing (attention stays inside a document); under causal packing the
    data's positions simply run 0..T-1 in every window."""
    tokens, targets, positions, document_ids = (batch[key].to(device, non_blocking=True) for key in
                                                ("tokens", "targets", "positions", "document_ids"))
    return loss_fn(tokens, targets, positions, document_ids if document else None)


@torch.no_grad()
def evaluate(model, batches, autocast, device, document) -> float:
    """Mean loss over the held-out micro-batches. Eager: a few batches do not repay compiling the
    no-grad graph (40-65 s on a CPU)."""
    model.eval()
    with autocast:
        # through `losses`, the method FSDP2 gathers parameters around; val_loss is its LM loss alone
        loss = torch.stack([micro_loss(model.losses, batch, device, document)["loss"] for batch in batches]).mean()
    model.train()
    return mean_over_ranks(loss).item()


def rng_state(device: torch.device) -> tuple[dict, dict]:
    """Every RNG a step may draw from: torch's as tensors, Python's and NumPy's as JSON."""
    tensors = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        tensors |= {f"cuda:{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return tensors, {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, gauss]}


def set_rng_state(tensors: dict, states: dict) -> None:
    torch.set_rng_state(tensors["cpu"])
    for name, state in tensors.items():
        if name.startswith("cuda:") and int(name[5:]) < torch.cuda.device_count():  # resumed elsewhere: skip
            torch.cuda.set_rng_state(state, name)
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(run_dir, recipe, step, model, optimizer, scaler, batches, skipped, tokens, device) -> None:
    """Every rank takes part in gathering full tensors (FSDP2 shards them); rank 0 writes; every rank raises
    what the write raised, so none is left waiting in the next step's collectives."""
    weights, optim = get_state_dict(model, optimizer, options=TO_SAVE)
    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        flat_optim = {f"{name}/{key}": value for name, state in optim["state"].items() for key, value in state.items()}
        rng_tensors, rng_json = rng_state(device)
        trainer = {"step": step, "data": batches.state_dict(), "skipped_steps": skipped, "tokens": tokens,
                   "scaler": scaler.state_dict(), "rng": rng_json}
        try:
            checkpoint.save(run_dir / "checkpoints", step, model=weights, optimizer=flat_optim, rng=rng_tensors,
                            trainer=trainer, recipe=recipe.to_dict(), keep=recipe.train.keep_checkpoints)
        except UserError as e:
            error = e
    if dist.is_initialized():
        outcome = [error]
        dist.broadcast_object_list(outcome, src=0)
        error = outcome[0]
    if error:
        raise error


def restore(ckpt: dict, model, optimizer, scaler, batches) -> dict:
    """Load a checkpoint into the live objects; returns its trainer state ({} for a weights-only one)."""
    try:
        if ckpt["trainer"] is None:  # weights only (e.g. an imported model): a fresh run from these weights
            set_model_state_dict(model, ckpt["model"], options=TO_LOAD)
            return {}
        optim = get_optimizer_state_dict(model, optimizer, options=TO_LOAD)  # this recipe's groups, by path
        optim["state"] = {}
        for key, value in ckpt["optimizer"].items():
            name, _, field = key.rpartition("/")
            optim["state"].setdefault(name, {})[field] = value
        set_state_dict(model, optimizer, model_state_dict=ckpt["model"], optim_state_dict=optim, options=TO_LOAD)
    except (RuntimeError, KeyError, ValueError) as e:
        reason = " ".join(line.strip() for line in str(e).strip().splitlines()[:2])  # the cause, not every key
        raise UserError(f"{ckpt['path']}: does not fit this model: {reason}") from None
    trainer = ckpt["trainer"]
    set_rng_state(ckpt["rng"], trainer["rng"])
    if trainer["scaler"]:  # empty when saved without fp16
        scaler.load_state_dict(trainer["scaler"])
    batches.load_state_dict(trainer["data"])
    return trainer


def check_changes(saved: dict, recipe: Recipe, where: Path, allowed) -> None:
    """Refuse a resume whose recipe changes a GUARDED key of the checkpoint's, unless allowed; report the rest."""
    now = json.loads(json.dumps(recipe.to_dict()))

    def covered(key, prefixes):
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    changed = []
    for section in ("model", "train", "data"):
        for key in sorted(set(saved[section]) | set(now[section])):
            old, new, dotted = saved[section].get(key), now[section].get(key), f"{section}.{key}"
            if old == new:
                continue
            if covered(dotted, GUARDED) and not covered(dotted, allowed):
                raise UserError(f"{dotted} changed from {old!r} to {new!r} since {where}; resuming would "
                                f"continue a different run (pass --allow-change {dotted} to accept)")
            changed.append(f"{dotted} {old!r} -> {new!r}")
    if changed:
        print(f"minsota: resuming with {', '.join(changed)}", file=sys.stderr)


@contextlib.contextmanager
def graceful_signals():
    """The first SIGINT/SIGTERM is recorded (the loop finishes its step and checkpoints); a second exits now."""
    received, trainer_pid = [], os.getpid()

    def handle(signum, frame):
        if os.getpid() != trainer_pid:  # a forked data worker (Ctrl-C reaches the whole process group)
            return
        if received:  # exit status 128 + signal number: 130 for SIGINT, 143 for SIGTERM
            os.write(2, b"\nminsota: second signal: exiting now; the last checkpoint is intact\n")
            os._exit(128 + signum)
        received.append(signum)
        os.write(2, f"\nminsota: {signal.Signals(signum).name}: finishing this step, then checkpointing "
                    f"(signal again to quit at once)\n".encode())

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def open_trackers(recipe: Recipe, run_dir: Path, stack: contextlib.ExitStack) -> list:
    """A ``track(step, scalars)`` per tracker in ``train.trackers``, closed with ``stack``: TensorBoard event
    files in RUN_DIR/tensorboard; W&B project "minsota", one W&B run per run directory, continued on resume."""
    trackers = []
    for name in recipe.train.trackers:
        try:
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                writer = stack.enter_context(SummaryWriter(str(run_dir / "tensorboard")))

                def track(step, scalars, writer=writer):
                    for key, value in scalars.items():
                        writer.add_scalar(key, value, step)
            else:
                import wandb

                run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
                run = wandb.init(project="minsota", name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
                                 config=recipe.to_dict())
                stack.callback(run.finish)

                def track(step, scalars, run=run):
                    run.log(scalars, step=step)
        except ImportError:
            raise UserError(f"train.trackers asks for {name}, which is not installed (pip install {name})") from None
        trackers.append(track)
    return trackers


def open_metrics(path: Path):
    """metrics.jsonl opened for appending; a record a kill cut short is dropped so every line parses."""
    if path.exists():
        with open(path, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 65536))
            tail = f.read()
            if tail and not tail.endswith(b"\n"):
                f.truncate(size - len(tail) + tail.rfind(b"\n") + 1)
    return open(path, "a")


# -------------------------------------------------------------------------------------------- train


def train(recipe: Recipe | None, run_dir: Path, resume: bool = False, overrides: dict | None = None,
          plugins=(), allow_changes=()) -> int:
    """Train ``recipe`` into ``run_dir``, or with ``resume`` continue the run there; returns the exit code.

    The process that writes the run directory (rank 0) holds its lock (`checkpoint.lock_run`) from before it
    reads the checkpoint to resume until it returns: a second trainer of the same directory is refused."""
    run_dir = Path(run_dir)
    named = bool(resume and checkpoint.STEP_DIR.fullmatch(run_dir.name))  # --resume RUN_DIR/checkpoints/step-N
    where = run_dir.parent.parent if named else run_dir
    with contextlib.ExitStack() as stack:
        # RANK: set by torchrun; the process group is joined later. Not a run directory: find_resumable says so.
        if int(os.environ.get("RANK", "0")) == 0 and (not resume or (where / "recipe.json").is_file()):
            stack.enter_context(checkpoint.lock_run(where, create=not resume))
        return _train(recipe, run_dir, resume, named, overrides, plugins, allow_changes)


def check_trackers(recipe: Recipe) -> None:
    """Refuse a tracker whose package is not installed, before the run directory is written."""
    for name in recipe.train.trackers:
        try:
            missing = importlib.util.find_spec(name) is None  # each tracker is named after its package
        except (ImportError, ValueError):  # ValueError: imported already, without a spec
            missing = False
        if missing:
            raise UserError(f"train.trackers asks for {name}, which is not installed (pip install {name})")


def _train(recipe: Recipe | None, run_dir: Path, resume: bool, named: bool, overrides: dict | None, plugins,
           allow_changes) -> int:
    ckpt = None
    if resume:
        run_dir, ckpt_path = checkpoint.find_resumable(run_dir)
        recipe = read_recipe_json(run_dir / "recipe.json", overrides, plugins)
        if ckpt_path is None:
            print(f"minsota: warning: {run_dir} has no checkpoint yet; starting it again from step 0", file=sys.stderr)
        else:
            ckpt = checkpoint.load(ckpt_path)
            check_changes(ckpt["recipe"], recipe, ckpt_path, allow_changes)
    elif (run_dir / "recipe.json").exists():
        raise UserError(f"{run_dir} holds a run already: continue it with --resume {run_dir}, or choose another --out")
    check_trackers(recipe)
    t = recipe.train
    document = recipe.data.packing == "document"

    rank, world, device = init_distributed(recipe)
    main = rank == 0  # the one process that writes the run directory and talks to the user
    dtype = autocast_dtype(t.precision, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls (all of them with precision fp32)
    torch.autograd.set_detect_anomaly(False)  # debugging APIs off (PyTorch performance tuning guide)
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    np.random.seed(t.seed)

    model = build_model(recipe, device)
    loss_module = parallelize(model, t.parallelism, dtype)
    optimizer = torch.optim.AdamW(param_groups(model, t), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                                  fused=device.type in ("cpu", "cuda"))  # fused: 22 ms vs foreach 93 ms on CPU
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # a no-op unless fp16
    loss_fn = torch.compile(loss_module) if t.compile else loss_module
    tokenizer = build_tokenizer(recipe)
    batches = build_batches(recipe, tokenizer, "train", rank, world)
    val_batches = list(itertools.islice(build_batches(recipe, tokenizer, "validation", rank, world),
                                        math.ceil(t.eval_batches / world)))  # ~eval_batches over all ranks
    accum = t.batch_size // (t.micro_batch_size * world)

    trainer = restore(ckpt, model, optimizer, scaler, batches) if ckpt else {}
    step, skipped, tokens = trainer.get("step", 0), trainer.get("skipped_steps", 0), trainer.get("tokens", 0)
    if step >= t.steps:
        print(f"minsota: {run_dir} is complete at step {step}; extend it with --set train.steps=N", file=sys.stderr)
        return 0
    if main:
        checkpoint.remove_temporary(run_dir / "checkpoints")
        if named:  # the later checkpoints are the branch this resume abandons: a plain resume must not find them
            checkpoint.set_aside_after(run_dir / "checkpoints", ckpt["step"])
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.write_json(run_dir / "recipe.json", recipe.to_dict())

    tokens_per_step = t.batch_size * t.seq_len
    flops_per_step = model.flops_per_token(t.seq_len) * tokens_per_step
    peak = peak_flops(device, dtype or torch.float32) * world
    if main:
        where = f"{device} {str(dtype or torch.float32).removeprefix('torch.')}"
        print(f"minsota: {recipe.name} -> {run_dir} | {model.num_parameters():,} parameters | "
              f"{f'{world}x {where} {t.parallelism}' if world > 1 else where} | {t.batch_size}x{t.seq_len} tokens "
              f"per step, {accum} micro-step(s) | {'resuming at' if ckpt else 'from'} step {step} of {t.steps}",
              file=sys.stderr)

    saved_step, stop = (step if ckpt else None), False
    # The process group is left to process exit: destroyed here, it can deadlock (gloo joins its threads
    # holding the GIL when DDP's reducer or FSDP2's mesh drops the last reference later).
    with contextlib.ExitStack() as stack:
        signals = stack.enter_context(graceful_signals())
        stack.callback(batches.close)  # on every way out, errors included: a worker left to exit would be joined late
        metrics = stack.enter_context(open_metrics(run_dir / "metrics.jsonl")) if main else None
        trackers = open_trackers(recipe, run_dir, stack) if main else []
        bar = stack.enter_context(tqdm(total=t.steps, initial=step, unit="step", dynamic_ncols=True,
                                       **({} if main else {"disable": True})))

        def log(record):
            if not main:
                return
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            scalars = {key: value for key, value in record.items() if key != "step" and not isinstance(value, str)}
            for track in trackers:
                track(record["step"], scalars)

        while step < t.steps and not stop:
            start = time.perf_counter()
            lr = lr_at(step, t)
            for group in optimizer.param_groups:
                group["lr"] = lr
            totals = {}  # the step's mean of each loss term: the LM loss, and any auxiliary ones
            for micro_step in range(accum):
                with gradient_sync(loss_module, model, micro_step == accum - 1):
                    with autocast:
                        losses = micro_loss(loss_fn, next(batches), device, document)
                    objective = losses["loss"] + losses["aux_loss"] if "aux_loss" in losses else losses["loss"]
                    scaler.scale(objective / accum).backward()
                for name, value in losses.items():
                    totals[name] = totals.get(name, 0) + value.detach().float() / accum
            totals = dict(zip(totals, mean_over_ranks(torch.stack(list(totals.values())))))  # the global batch's
            asked = mean_over_ranks(torch.tensor(float(bool(signals)), device=device))  # every rank stops together
            scaler.unscale_(optimizer)  # (fp16) clip and check the true gradients
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or math.inf, foreach=True)
            if isinstance(grad_norm, DTensor):  # FSDP2: already the global norm, as a replicated DTensor
                grad_norm = grad_norm.full_tensor()
            *values, norm_value, asked_value = torch.stack([*totals.values(), grad_norm, asked]).tolist()  # one sync
            terms = dict(zip(totals, values))
            loss_value = terms.pop("loss")
            stop = asked_value > 0
            # fp16's scaler skips inf/NaN gradients by itself (and lowers the scale); anything else diverged
            finite = math.isfinite(loss_value) and (math.isfinite(norm_value) or scaler.is_enabled())
            if finite:
                scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += tokens_per_step

            if finite:
                elapsed = time.perf_counter() - start
                log({"step": step, "loss": loss_value, **terms, "lr": lr, "grad_norm": norm_value, "tokens": tokens,
                     "epoch": batches.epoch, "tokens_per_s": tokens_per_step / elapsed,
                     "mfu": flops_per_step / elapsed / peak})
                if step % t.log_every == 0 or step == t.steps:
                    bar.set_postfix_str(f"loss {loss_value:.4f}, lr {lr:.2e}, {tokens_per_step / elapsed:,.0f} "
                                        f"tok/s, MFU {flops_per_step / elapsed / peak:.1%}", refresh=False)
            else:
                skipped += 1
                what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                log({"step": step, "lr": lr, "skipped": f"non-finite {what}"})
                if skipped > t.max_bad_steps:
                    raise DivergedError(f"step {step}: non-finite {what}; parameters were not updated (lower "
                                        f"train.lr, or let train.max_bad_steps skip such steps)")
                if main:
                    tqdm.write(f"minsota: warning: step {step}: non-finite {what}, step skipped "
                               f"({skipped} of train.max_bad_steps = {t.max_bad_steps})", file=sys.stderr)
            bar.update()

            if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                val_loss = evaluate(model, val_batches, autocast, device, document)
                log({"step": step, "val_loss": val_loss})
                if main:
                    tqdm.write(f"step {step}: val_loss {val_loss:.4f}", file=sys.stderr)
            if stop:
                batches.close()  # the data workers end with the step they served, before the checkpoint
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or stop:
                save_checkpoint(run_dir, recipe, step, model, optimizer, scaler, batches, skipped, tokens, device)
                saved_step = step

        if stop:
            if main:
                print(f"minsota: stopped at step {step}; continue with: minsota train --resume {run_dir}",
                      file=sys.stderr)
            return 128 + (signals[0] if signals else signal.SIGTERM)  # 130 after SIGINT, 143 after SIGTERM
        val_loss = evaluate(model, val_batches, autocast, device, document)
        log({"step": step, "val_loss": val_loss})
        if saved_step != step:
            save_checkpoint(run_dir, recipe, step, model, optimizer, scaler, batches, skipped, tokens, device)
        if main:
            print(f"minsota: done: step {step}, val_loss {val_loss:.4f}; run in {run_dir}", file=sys.stderr)
        if t.sample_tokens:  # a fresh document (after EOS), on every rank: FSDP2 gathers weights collectively
            new = generate(model.eval(), [tokenizer.eos_id], t.sample_tokens, seed=t.seed, stop_id=tokenizer.eos_id)
            if main:
                print(f"--- sample ---\n{tokenizer.decode(new)}\n---")
    return 0
