"""Recomputation: recompute in backward what forward would otherwise keep (``train.activation_checkpointing``).

Chen et al. 2016 (https://arxiv.org/abs/1604.06174) trade compute for memory; torchtitan offers the same
three settings:
  none       every block keeps what backward needs (the fastest)
  full       each block keeps only its input state and runs its forward again in backward (~1/3 more compute;
             activations per layer fall from tens of bytes per token and dimension to the residual stream's)
  selective  each block keeps the outputs of its matmuls and attention kernel, the costly ops, and recomputes
             the cheap element-wise ones (norms, activations, rotary, residual adds) around them: little extra
             compute, a part of the saving (Korthikanti et al. 2022, https://arxiv.org/abs/2205.05198, keep the
             same split in spirit)
Checkpointing is torch.utils.checkpoint's non-reentrant form, which wraps any inputs, the TensorDict state
included, and works under torch.compile and FSDP2 (the gathered weights are gathered again for the
recomputation). The block's ``forward`` is wrapped on the instance, so parameter names stay as they are, and
runs on a shallow copy of the state, which the block may write into.
"""

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective")

_aten = torch.ops.aten
# What selective checkpointing keeps: outputs of matmuls and fused attention (whichever backend runs).
COSTLY = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten.baddbmm.default,
    *(
        getattr(_aten, name).default
        for name in (
            "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_cudnn_attention",
            "_scaled_dot_product_flash_attention_for_cpu",
        )
        if hasattr(_aten, name)
    ),
}


def _keep_costly(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in COSTLY else CheckpointPolicy.PREFER_RECOMPUTE


def _selective():
    return create_selective_checkpoint_contexts(_keep_costly)


def checkpoint_activations(model: nn.Module, mode: str) -> None:
    """Wrap every block of ``model`` (``model.layers``) for ``mode`` (one of `MODES`), in place."""
    if mode == "none":
        return
    options = {"use_reentrant": False}
    if mode == "selective":
        options["context_fn"] = _selective
    for block in model.layers:
        block.forward = functools.partial(checkpoint, functools.partial(_on_a_copy, block), **options)


def _on_a_copy(block: nn.Module, state):
    # A block writes its keys into the state it is given; the recomputation must see the input as it was.
    return type(block).forward(block, state.copy())
