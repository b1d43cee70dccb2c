"""The trainer: one loop a reader follows top to bottom (nanoGPT's train.py is the bar for legibility).

`train(recipe, run_dir)` builds the model, the optimizer (`train.optimizer`) and the data from a resolved recipe and runs
`train.steps` optimizer steps of `train.batch_size` sequences each (gradient accumulation over
micro-batches); `resume(run_dir)` continues a run from its checkpoint. Every step appends one JSON line to
RUN_DIR/metrics.jsonl; every `eval_every` steps and at the end the validation loss is measured; every
`checkpoint_every` steps and at the end a checkpoint is written (minsota.train_state); at the end the model
samples a little text (minsota.generation).

The rooms beside it: `minsota.optim` (parameter groups, optimizer and schedule plugins, warmup), `minsota.step` (the one
optimizer step), `minsota.distributed` (DDP/FSDP2), `minsota.train_state` (what a checkpoint holds),
`minsota.rundir` (lock, resume, metrics file, trackers) and `minsota.runtime` (device, precision, evaluation).

Faults: the first SIGINT/SIGTERM lets the step finish, checkpoints it and exits 130/143; a second exits at
once. A non-finite loss or gradient norm is caught before `optimizer.step()`, so parameters stay untouched:
the step is skipped (up to `max_bad_steps` times), then training stops with exit 3. One trainer at a time writes
a run directory (its lock, RUN_DIR/.lock); a second one exits 2 naming the holder. `--resume` restores
weights, the optimizer's whole state, RNG states and the data position, so on CPU fp32 the resumed losses equal an
uninterrupted run's bit for bit.
"""

import contextlib
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
from tqdm import tqdm

from minsota import checkpoint, memory, rundir
from minsota.data import build_batches, build_tokenizer
from minsota.distributed import build_device, init_distributed, parallelize
from minsota.errors import DivergedError
from minsota.generation import generate
from minsota.model import build_model
from minsota.optim import build_optimizer, build_scaler, build_schedule, eval_mode, lr_multiplier, train_mode
from minsota.recipe import Recipe
from minsota.recompute import checkpoint_activations
from minsota.runtime import (
    autocast_context,
    autocast_dtype,
    datasheet_flops,
    evaluate,
    gemm_flops,
    gemm_shapes,
    keep_allocations_in_heap,
    peak_flops,
    resolve_device,
)
from minsota.step import train_step
from minsota.train_state import TrainState, restore, save_checkpoint


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
        os.write(
            2,
            f"\nminsota: {signal.Signals(signum).name}: finishing this step, then checkpointing "
            f"(signal again to quit at once)\n".encode(),
        )

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# -------------------------------------------------------------------------------------------- train


def train(recipe: Recipe, run_dir: Path) -> int:
    """Train ``recipe`` into the new run directory ``run_dir``; returns the exit code. The process that writes
    the run directory (rank 0) holds its lock (`rundir.lock`) until it returns."""
    run_dir = Path(run_dir)
    try:
        with rundir.lock(run_dir, create=True):
            rundir.refuse_existing(run_dir)
            try:
                return _run(recipe, run_dir, None, abandon_after=None)
            except KeyboardInterrupt:  # the loop checkpoints on SIGINT: this is start-up
                if int(os.environ.get("RANK", "0")) == 0:
                    rundir.discard_unstarted(run_dir)  # before the lock is released, and lock_run removes what it made
                raise
    except KeyboardInterrupt:
        raise _interrupted_start_up("the new run left nothing behind: the same command starts it again") from None


def resume(path: Path, overrides: dict | None = None, plugin_specs=(), allow_changes=()) -> int:
    """Continue the run at ``path`` (a run directory, or one of its checkpoints ``RUN_DIR/checkpoints/step-N``,
    whose later checkpoints are then set aside) with its own recipe and ``overrides``; returns the exit code.
    The lock is held from before the checkpoint to resume is read."""
    path = Path(path)
    named = bool(checkpoint.STEP_DIR.fullmatch(path.name))
    where = path.parent.parent if named else path
    try:
        with rundir.lock(where, create=False):
            run_dir, recipe, ckpt = rundir.open_resumed(path, overrides, plugin_specs, allow_changes)
            return _run(recipe, run_dir, ckpt, abandon_after=ckpt["step"] if named else None)
    except KeyboardInterrupt:
        raise _interrupted_start_up(f"{where} is unchanged: continue it with minsota train --resume {where}") from None


def _interrupted_start_up(then: str) -> KeyboardInterrupt:
    """A Ctrl-C that reached the trainer before its loop (which checkpoints on SIGINT itself), in one line."""
    return KeyboardInterrupt(f"during start-up, before the first step; {then}")


def _seed(seed: int, device: torch.device) -> None:
    """Numerics settings and every RNG a run draws from, before the model is built."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls (all of them with precision fp32)
    torch.autograd.set_detect_anomaly(False)  # debugging APIs off (PyTorch performance tuning guide)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _run(recipe: Recipe, run_dir: Path, ckpt: dict | None, abandon_after: int | None) -> int:
    """Assemble the run (model, optimizer, data), restore ``ckpt`` into it, then `_loop`."""
    keep_allocations_in_heap()  # before the model and the data: every later large tensor reuses the heap
    rundir.check_trackers(recipe)
    t = recipe.train
    tasks = _task_evaluator(recipe) if t.eval_tasks else None  # refused now if the harness cannot run them
    rank, world, device = init_distributed(recipe, resolve_device(t.device))
    main = rank == 0  # the one process that writes the run directory and talks to the user
    dtype = autocast_dtype(t.precision, device)
    _seed(t.seed, device)

    memory.check(recipe, device, dtype, world)  # before anything is allocated
    model = build_model(recipe, build_device(t.parallelism))  # CPU; "meta" on FSDP2's ranks but 0
    checkpoint_activations(model, t.activation_checkpointing)
    loss_module, loss_fn = parallelize(model, t.parallelism, dtype, device, t.compile)  # loss_fn compiled or not
    state = TrainState(model, build_optimizer(model, t, recipe.plugins), build_scaler(device, dtype), batches=None)
    train_mode(state.optimizer)  # optimizers with modes (schedule-free) step, and restore, in training mode
    tokenizer, state.batches, val_batches = _data(recipe, rank, world)
    accum = t.batch_size // (t.micro_batch_size * world)
    if ckpt:
        restore(ckpt, state)
        train_mode(state.optimizer)  # checkpoints hold the optimizer's evaluation mode (`eval_mode`)
    if state.step >= t.steps:
        print(
            f"minsota: {run_dir} is complete at step {state.step}; extend it with --set train.steps=N", file=sys.stderr
        )
        return 0
    if main:
        rundir.prepare(run_dir, recipe, abandon_after)
        where = f"{device} {str(dtype or torch.float32).removeprefix('torch.')}"
        print(
            f"minsota: {recipe.name} -> {run_dir} | {model.num_parameters():,} parameters | "
            f"{f'{world}x {where} {t.parallelism}' if world > 1 else where} | {t.batch_size}x{t.seq_len} tokens "
            f"per step, {accum} micro-step(s) | {'resuming at' if ckpt else 'from'} step {state.step} of {t.steps}",
            file=sys.stderr,
        )

    autocast = autocast_context(device, dtype)
    document = recipe.data.packing == "document"

    def step(lr_scale: float, stop_requested):
        return train_step(
            state,
            loss_fn,
            lr_scale,
            device=device,
            accum=accum,
            grad_clip=t.grad_clip,
            autocast=autocast,
            document=document,
            loss_module=loss_module,
            stop_requested=stop_requested,
        )

    # evaluation, checkpoints and samples see the optimizer's evaluation weights (`minsota.optim.eval_mode`)
    def validate(final: bool) -> dict:
        """What is due after this step: the validation loss every `eval_every` steps, the downstream tasks every
        `eval_tasks_every` steps, and both at the end."""
        loss_due = final or (t.eval_every and state.step % t.eval_every == 0)
        tasks_due = tasks and (final or (t.eval_tasks_every and state.step % t.eval_tasks_every == 0))
        record = {}
        if loss_due or tasks_due:  # only then: a mode switch may move weights (schedule-free)
            with eval_mode(state.optimizer):
                if loss_due:
                    record["val_loss"] = evaluate(model, val_batches, autocast, device, document)
                if tasks_due:
                    record |= tasks(model, tokenizer, autocast)
        return record

    def save() -> None:
        with eval_mode(state.optimizer):
            save_checkpoint(run_dir, recipe, state, device)

    def sample() -> None:  # a fresh document (after EOS), on every rank: FSDP2 gathers weights collectively
        with eval_mode(state.optimizer):
            new = generate(model.eval(), [tokenizer.eos_id], t.sample_tokens, seed=t.seed, stop_id=tokenizer.eos_id)
        if main:
            print(f"--- sample ---\n{tokenizer.decode(new)}\n---")

    return _loop(
        recipe,
        run_dir,
        state,
        step,
        validate,
        save,
        sample if t.sample_tokens else None,
        main,
        saved_step=state.step if ckpt else None,
        mfu=_mfu(model, t, device, dtype, world),
    )


def _data(recipe: Recipe, rank: int, world: int) -> tuple:
    """(tokenizer, this rank's training batches, its validation micro-batches: ~eval_batches over all ranks)."""
    tokenizer = build_tokenizer(recipe)
    train_batches = build_batches(recipe, tokenizer, "train", rank, world)
    validation = build_batches(recipe, tokenizer, "validation", rank, world)
    return tokenizer, train_batches, list(itertools.islice(validation, math.ceil(recipe.train.eval_batches / world)))


def _task_evaluator(recipe: Recipe):
    """``train.eval_tasks`` through lm-evaluation-harness (`minsota.harness`: the optional [eval] extra, imported
    only when a recipe asks)."""
    from minsota.harness import TaskEvaluator

    return TaskEvaluator(recipe)


def _mfu(model, t, device: torch.device, dtype: torch.dtype | None, world: int):
    """``mfu(elapsed) -> dict``: a step's model FLOPs utilisation against the measured matmul rate, against the
    rate the model's own GEMM shapes reach here (`gemm_shapes`; two passes, each ~1/layers of a step's matmuls),
    and against the datasheet's peak where the device is known."""
    flops_per_step = model.flops_per_token(t.seq_len) * t.batch_size * t.seq_len
    dtype = dtype or torch.float32
    peak = peak_flops(device, dtype) * world
    gemms = gemm_flops(gemm_shapes(model, t.micro_batch_size * t.seq_len), device, dtype, repeats=1) * world
    datasheet = datasheet_flops(torch.cuda.get_device_name(device), dtype) if device.type == "cuda" else None

    def mfu(elapsed: float) -> dict:
        figures = {"mfu": flops_per_step / elapsed / peak, "mfu_gemms": flops_per_step / elapsed / gemms}
        return figures | ({"mfu_datasheet": flops_per_step / elapsed / (datasheet * world)} if datasheet else {})

    return mfu


def _loop(
    recipe: Recipe, run_dir: Path, state: TrainState, step, validate, save, sample, main: bool, saved_step, mfu
) -> int:
    """Steps until ``train.steps`` or a signal: log each, evaluate and checkpoint on schedule, then finish."""
    t = recipe.train
    tokens_per_step = t.batch_size * t.seq_len
    # The process group is left to process exit: destroyed here, it can deadlock (gloo joins its threads
    # holding the GIL when DDP's reducer or FSDP2's mesh drops the last reference later).
    with contextlib.ExitStack() as stack:
        signals = stack.enter_context(graceful_signals())
        stack.callback(state.batches.close)  # on every way out, errors included: a worker left would be joined late
        log = _logger(recipe, run_dir, stack, main)
        bar = stack.enter_context(
            tqdm(
                total=t.steps,
                initial=state.step,
                unit="step",
                dynamic_ncols=True,
                **({} if main else {"disable": True}),
            )
        )
        stop, schedule = False, build_schedule(t, recipe.plugins)
        while state.step < t.steps and not stop:
            start = time.perf_counter()
            multiplier = lr_multiplier(state.step, t, schedule)
            lr = t.lr * multiplier  # logged: train.lr's share; each group's own is its base lr × multiplier
            result = step(multiplier, lambda: bool(signals))
            stop = result.stop
            state.step += 1
            state.tokens += tokens_per_step
            if result.finite:
                _report(state, result, lr, time.perf_counter() - start, t, log, bar, mfu)
            else:
                _skip(state, result, lr, t, log, main)
            bar.update()

            if state.step < t.steps:
                _evaluated(state.step, validate(final=False), log, main)
            if stop:
                state.batches.close()  # the data workers end with the step they served, before the checkpoint
            if (t.checkpoint_every and state.step % t.checkpoint_every == 0) or stop:
                save()
                saved_step = state.step

        if stop:
            if main:
                print(
                    f"minsota: stopped at step {state.step}; continue with: minsota train --resume {run_dir}",
                    file=sys.stderr,
                )
            return 128 + (signals[0] if signals else signal.SIGTERM)  # 130 after SIGINT, 143 after SIGTERM
        final = validate(final=True)
        log({"step": state.step, **final})
        if saved_step != state.step:
            save()
        if main:
            figures = ", ".join(f"{key} {value:.4f}" for key, value in final.items())
            print(f"minsota: done: step {state.step}, {figures}; run in {run_dir}", file=sys.stderr)
        if sample:
            sample()
    return 0


def _evaluated(step: int, record: dict, log, main: bool) -> None:
    """Log an evaluation's figures (none: nothing was due) and show them above the progress bar."""
    if record:
        log({"step": step, **record})
        if main:
            tqdm.write(f"step {step}: {', '.join(f'{k} {v:.4f}' for k, v in record.items())}", file=sys.stderr)


def _logger(recipe: Recipe, run_dir: Path, stack: contextlib.ExitStack, main: bool):
    """``log(record)``: a line of RUN_DIR/metrics.jsonl, flushed, and its scalars to every tracker (rank 0)."""
    if not main:
        return lambda record: None
    metrics = stack.enter_context(rundir.open_metrics(run_dir / "metrics.jsonl"))
    trackers = rundir.open_trackers(recipe, run_dir, stack)

    def log(record: dict) -> None:
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        scalars = {key: value for key, value in record.items() if key != "step" and not isinstance(value, str)}
        for track in trackers:
            track(record["step"], scalars)

    return log


def _report(state: TrainState, result, lr: float, elapsed: float, t, log, bar, mfu) -> None:
    """A step done: its line in metrics.jsonl, and the progress bar's figures every ``train.log_every`` steps."""
    tokens_per_step = t.batch_size * t.seq_len
    figures = mfu(elapsed)
    log(
        {
            "step": state.step,
            "loss": result.loss,
            **result.aux,
            "lr": lr,
            "grad_norm": result.grad_norm,
            "tokens": state.tokens,
            "epoch": state.batches.epoch,
            "tokens_per_s": tokens_per_step / elapsed,
            **figures,
        }
    )
    if state.step % t.log_every == 0 or state.step == t.steps:
        bar.set_postfix_str(
            f"loss {result.loss:.4f}, lr {lr:.2e}, {tokens_per_step / elapsed:,.0f} tok/s, MFU {figures['mfu']:.1%}",
            refresh=False,
        )


def _skip(state: TrainState, result, lr: float, t, log, main: bool) -> None:
    """A non-finite step: logged and skipped, up to ``train.max_bad_steps`` times, then `DivergedError`."""
    state.skipped += 1
    what = "loss" if not math.isfinite(result.loss) else "gradient norm"
    log({"step": state.step, "lr": lr, "skipped": f"non-finite {what}"})
    if state.skipped > t.max_bad_steps:
        raise DivergedError(
            f"step {state.step}: non-finite {what}; parameters were not updated (lower "
            f"train.lr, or let train.max_bad_steps skip such steps)"
        )
    if main:
        tqdm.write(
            f"minsota: warning: step {state.step}: non-finite {what}, step skipped "
            f"({state.skipped} of train.max_bad_steps = {t.max_bad_steps})",
            file=sys.stderr,
        )
