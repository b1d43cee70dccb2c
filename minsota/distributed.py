"""Data parallelism under torchrun: joining the process group, DDP or FSDP2 wrapping, gradient sync, means over ranks.

torchtitan keeps parallelism in a module of its own; so does minsota, so that the trainer's loop reads the
same in one process and in many. One process (WORLD_SIZE unset or 1) never touches torch.distributed.
"""

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.nn.parallel import DistributedDataParallel

from minsota.errors import UserError
from minsota.recipe import Recipe


def init_distributed(recipe: Recipe, device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on CUDA,
    gloo on CPU; a CUDA ``device`` becomes this rank's GPU. One process runs alone whatever
    train.parallelism says."""
    t, world = recipe.train, int(os.environ.get("WORLD_SIZE", "1"))
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
        # buffers are not broadcast from rank 0: every rank's own (an MoE's per-step token counts) must survive
        return DistributedDataParallel(LossAsForward(model), broadcast_buffers=False)
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
