"""What a checkpoint holds of a training run, and moving it between the live objects and `minsota.checkpoint`.

`TrainState` is the model, optimizer, loss scaler and data position, plus the counters (optimizer steps
done, steps skipped as non-finite, tokens seen). `save_checkpoint` gathers it (FSDP2 shards included) and
rank 0 writes it; `restore` loads one back, RNG states too, so a resumed run continues bit for bit. Under
torchrun rank 0 alone reads (and hashes) the weights and optimizer state and broadcasts them (each rank keeps
its shards).
"""

import json
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from minsota import checkpoint
from minsota.distributed import checkpoint_group
from minsota.errors import UserError
from minsota.loader import recipe_record
from minsota.recipe import Recipe

# State dicts by parameter path with whole tensors (FSDP2 shards gathered): to save, on rank 0's CPU only;
# to load, rank 0 alone holds them and sends each rank its part, tensor by tensor
TO_SAVE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _to_load() -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized())


@dataclass
class TrainState:
    """The live objects and counters a checkpoint holds."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    batches: object  # minsota.data.Batches, or any iterator of micro-batches (a benchmark's)
    step: int = 0  # optimizer steps completed
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    tokens: int = 0  # tokens trained on


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


def split_optimizer_state(optim: dict) -> tuple[dict, dict]:
    """An optimizer state dict by parameter path as (tensors "{path}/{key}" for safetensors, the rest as JSON:
    non-tensor per-parameter state such as an int step or a nested dict, and each group's entries)."""
    tensors, other = {}, {}
    for name, entry in optim["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value
            else:
                other.setdefault(name, {})[key] = value
    groups = [{key: value for key, value in group.items() if key != "params"} for group in optim["param_groups"]]
    return tensors, json.loads(json.dumps({"state": other, "param_groups": groups}, default=list))


def _optimizer_state(ckpt: dict, state: TrainState, options) -> dict:
    """The checkpoint's optimizer state in the live optimizer's form: tensors and JSON state by parameter path,
    the live groups (this recipe's hyperparameters) with the saved values of the optimizer's own counters. The
    ranks that receive the state from rank 0 (``ckpt["optimizer"]`` None) give only the groups."""
    for p in [p for p, entry in state.optimizer.state.items() if not entry]:  # looked up, never filled (schedule-
        del state.optimizer.state[p]  # free's train()): DCP then takes the state as built and skips its lazy init
    optim = get_optimizer_state_dict(state.model, state.optimizer, options=options)  # this recipe's groups
    saved = ckpt["trainer"].get("optimizer") or {"state": {}, "param_groups": []}
    received = ckpt["optimizer"] is None
    optim["state"] = {} if received else {name: dict(entry) for name, entry in saved["state"].items()}
    for key, value in (ckpt["optimizer"] or {}).items():
        name, _, field = key.rpartition("/")
        optim["state"].setdefault(name, {})[field] = value
    keys = getattr(state.optimizer, "group_state_keys", ())
    if keys and len(saved["param_groups"]) == len(optim["param_groups"]):
        for live, old in zip(optim["param_groups"], saved["param_groups"]):
            live.update({key: old[key] for key in keys if key in old})
    return optim


def save_checkpoint(run_dir, recipe: Recipe, state: TrainState, device: torch.device) -> None:
    """Checkpoint ``state`` as RUN_DIR/checkpoints/step-N. Every rank takes part in gathering full tensors
    (FSDP2 shards them); rank 0 writes and hashes while the others wait on `checkpoint_group` (its timeout
    allows for a large file); every rank raises what the write raised, so none is left waiting in the next
    step's collectives."""
    weights, optim = get_state_dict(state.model, state.optimizer, options=TO_SAVE)
    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        tensors, other = split_optimizer_state(optim)
        rng_tensors, rng_json = rng_state(device)
        trainer = {
            "step": state.step,
            "data": state.batches.state_dict(),
            "skipped_steps": state.skipped,
            "tokens": state.tokens,
            "scaler": state.scaler.state_dict(),
            "rng": rng_json,
            "optimizer": other,
        }
        try:
            checkpoint.save(
                run_dir / "checkpoints",
                state.step,
                model=weights,
                optimizer=tensors,
                rng=rng_tensors,
                trainer=trainer,
                recipe=recipe_record(recipe),
                keep=recipe.train.keep_checkpoints,
            )
        except UserError as e:
            error = e
    if dist.is_initialized():
        outcome = [error]
        dist.broadcast_object_list(outcome, src=0, group=checkpoint_group())  # a long wait, on its own group
        error = outcome[0]
    if error:
        raise error


def _rank_zeros(ckpt: dict) -> dict:
    """The checkpoint as rank 0 chose it. The other ranks chose theirs without hashing the weights and optimizer
    state, which they never read (`minsota.rundir.find_resumable`): where rank 0 found those corrupt and fell
    back to an earlier checkpoint, they follow it."""
    if not dist.is_initialized():
        return ckpt
    chosen = [ckpt["path"]]
    dist.broadcast_object_list(chosen, src=0, group=checkpoint_group())
    if chosen[0] == ckpt["path"]:
        return ckpt
    return checkpoint.load(chosen[0], tensors_of_the_model=False)


def restore(ckpt: dict, state: TrainState) -> None:
    """Load a checkpoint into ``state``: weights, and unless it is weights-only (e.g. an imported model, which
    starts a fresh run from its weights) the optimizer, RNG, loss scaler, data position and counters."""
    ckpt = _rank_zeros(ckpt)
    options, weights = _to_load(), ckpt["model"] or {}  # {} on the ranks that receive them from rank 0
    try:
        if ckpt["trainer"] is None:
            set_model_state_dict(state.model, weights, options=options)
            return
        optim = _optimizer_state(ckpt, state, options)
        # one at a time: set_state_dict takes an empty model dict (the receiving ranks') for "optimizer only"
        set_model_state_dict(state.model, weights, options=options)
        set_optimizer_state_dict(state.model, state.optimizer, optim, options=options)
    except (RuntimeError, KeyError, ValueError) as e:
        raise checkpoint.does_not_fit(ckpt["path"], e) from None
    trainer = ckpt["trainer"]
    set_rng_state(ckpt["rng"], trainer["rng"])
    if trainer["scaler"]:  # empty when saved without fp16
        state.scaler.load_state_dict(trainer["scaler"])
    state.batches.load_state_dict(trainer["data"])
    state.step, state.skipped, state.tokens = trainer["step"], trainer["skipped_steps"], trainer["tokens"]
