"""Data parallelism under torchrun: joining the process group, DDP or FSDP2 wrapping, gradient sync, means over ranks.

torchtitan keeps parallelism in a module of its own; so does minsota, so that the trainer's loop reads the
same in one process and in many. One process (WORLD_SIZE unset or 1) never touches torch.distributed.
"""

import contextlib
import os
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from tensordict import TensorDict
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.nn.parallel import DistributedDataParallel

from minsota.errors import UserError
from minsota.recipe import Recipe
from minsota.state import HIDDEN

# Rank 0 writes and hashes a checkpoint while the other ranks wait for its outcome: they wait on a CPU (gloo)
# group of their own, whose timeout allows for a 100 GB file, not in the training collectives (NCCL's 10 min).
CHECKPOINT_TIMEOUT = timedelta(hours=2)
_checkpoint_group = None


def checkpoint_group():
    """The process group the ranks wait on while rank 0 writes a checkpoint (None in one process)."""
    return _checkpoint_group


def init_distributed(recipe: Recipe, device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on CUDA,
    gloo on CPU (or keeps the one the host process joined, if its size and backend are those); a CUDA
    ``device`` becomes this rank's GPU. One process runs alone whatever train.parallelism says."""
    t, world = recipe.train, int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if t.parallelism == "none":
        raise UserError(
            f"{recipe.where('train.parallelism')}: launched as {world} processes but train.parallelism "
            f"= none: set train.parallelism=ddp or fsdp"
        )
    if t.parallelism == "fsdp" and t.precision == "fp16":
        raise UserError(
            f"{recipe.where('train.precision')}: fp16 with fsdp is not supported (its loss scaler would "
            f"need sharding): use bf16"
        )
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    elif (dist.get_world_size(), dist.get_backend()) != (world, backend):  # joined by the host (tests/jobs.py)
        raise UserError(
            f"this process already joined a process group of {dist.get_world_size()} {dist.get_backend()} ranks; "
            f"training on {device.type} under WORLD_SIZE={world} needs {world} {backend} ranks"
        )
    global _checkpoint_group
    _checkpoint_group = dist.new_group(backend="gloo", timeout=CHECKPOINT_TIMEOUT)
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


def build_device(parallelism: str) -> torch.device:
    """Where `minsota.model.build_model` builds and initialises: on the CPU (so weights are the CPU RNG's, the
    same on any device and world size; `parallelize` moves them), and under FSDP2 every rank but 0 on "meta"
    (nothing allocated: `parallelize` materialises its shards only, with rank 0's weights)."""
    sharded = dist.is_initialized() and parallelism == "fsdp" and dist.get_rank() != 0
    return torch.device("meta" if sharded else "cpu")


def parallelize(
    model: nn.Module, parallelism: str, dtype: torch.dtype | None, device: torch.device, compile: bool = False
):
    """(loss module, loss function). The module computes the training loss: `model.losses` itself, through DDP,
    or on a model sharded by FSDP2 (Zhao et al. 2023, arXiv:2304.11277; weights gathered per unit for compute);
    the function is what the step calls: the same, compiled when ``compile``.

    In one process the whole loss compiles as one graph (under DDP, split at its gradient buckets). Under FSDP2,
    whose hooks break a graph at every unit (pytorch#181924), each block is one unit and compiles on its own
    (one graph serves every block of one kind), then the root (embeddings, final norm, head) is the last unit,
    as in torchtitan; the root runs eagerly around the compiled blocks.

    Under FSDP2 rank 0 alone built the weights (its own RNG, as one process would: the same model at every
    world size); the others built on meta (`build_device`). After sharding, every rank allocates only its
    shards on ``device`` and receives them from rank 0 (``broadcast_from_rank0``), buffers too.
    """
    if not dist.is_initialized() or parallelism == "ddp":
        model.to(device)  # from the CPU it was built on (`build_device`)
        loss = model.losses
        if dist.is_initialized():  # buffers not broadcast from rank 0: each rank's own (MoE token counts) survive
            loss = DistributedDataParallel(LossAsForward(model), broadcast_buffers=False)
        return loss, torch.compile(loss) if compile else loss
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    full = model.state_dict() if dist.get_rank() == 0 else {}  # rank 0's full tensors, before they are sharded
    for block in model.layers:
        if compile:  # its forward, not the module: FSDP2's hooks stay outside the graph
            block.forward = torch.compile(block.forward, fullgraph=True)
        _shard_block(block, policy)
    fully_shard(model, mp_policy=policy)
    _materialise(model, full, device)
    register_fsdp_forward_method(model, "losses")  # gather the embeddings and head around it as around forward
    return model.losses, model.losses


def _shard_block(block: nn.Module, policy: MixedPrecisionPolicy) -> None:
    """Make ``block`` one FSDP2 unit. FSDP2 finds the tensors whose backward must gather the weights again (and
    those whose gradients end the unit's backward) in the dicts, lists and dataclasses a unit takes and returns,
    never inside a TensorDict: without help the block's weights would be freed when backward needs them. So
    around FSDP2's own hooks the state is a plain dict (same tensors, same keys), and a TensorDict again inside
    the block and after it."""
    # `embeddings` passes through every block; FSDP2's post-backward function hands it on as a view, which it
    # warns of (an in-place write would lose its hook): blocks only read it (`minsota.state`)
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")
    fully_shard(block, mp_policy=policy)
    block.register_forward_pre_hook(lambda _, args: (args[0].to_dict(),), prepend=True)  # before FSDP2's
    block.register_forward_pre_hook(lambda _, args: (_as_state(args[0]),))  # after FSDP2's, before forward
    block.register_forward_hook(lambda _, args, state: state.to_dict(), prepend=True)  # before FSDP2's
    block.register_forward_hook(lambda _, args, entries: _as_state(entries))  # after FSDP2's


def _as_state(entries: dict) -> TensorDict:
    return TensorDict(entries, batch_size=entries[HIDDEN].shape[:2])


def _materialise(model: nn.Module, full: dict, device: torch.device) -> None:
    """Each rank's shards allocated on ``device`` and filled from rank 0's ``full`` state dict; buffers (not
    in it when non-persistent, e.g. RoPE's frequencies) broadcast from rank 0 as they are."""
    buffers = {name: b.clone() for name, b in model.named_buffers()} if dist.get_rank() == 0 else {}
    model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, buffer in model.named_buffers():
        if dist.get_rank() == 0:
            buffer.copy_(buffers[name])
        dist.broadcast(buffer, src=0)


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
