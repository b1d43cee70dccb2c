"""One optimizer step: the step the trainer runs and `benchmarks/bench_train_step.py` times.

Gradient accumulation over ``accum`` micro-batches (gradients all-reduced on the last one only), the global
batch's mean loss, the fp16 loss scaler, gradient clipping, and the finiteness check before
``optimizer.step()``: a non-finite loss or gradient norm leaves the parameters untouched. One host sync per
step (the loss, the norm and the stop request read together), and one all-reduce for the loss and stop request.
"""

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from minsota.distributed import gradient_sync, mean_over_ranks
from minsota.runtime import micro_loss
from minsota.train_state import TrainState


@dataclass(frozen=True)
class StepResult:
    loss: float  # the global batch's mean LM loss
    grad_norm: float  # before clipping
    finite: bool  # False: the step was skipped, parameters untouched
    stop: bool  # some rank was asked to stop (a signal): every rank stops after this step
    aux: dict[str, float] = field(default_factory=dict)  # auxiliary terms' means: aux_loss and each by name


def train_step(
    state: TrainState,
    loss_fn,
    lr_scale: float,
    *,
    device: torch.device,
    accum: int = 1,
    grad_clip: float = 0.0,
    autocast=None,
    document: bool = False,
    loss_module=None,
    stop_requested: Callable[[], bool] = lambda: False,
) -> StepResult:
    """Run one optimizer step on ``accum`` micro-batches drawn from ``state.batches``, each group's lr its
    ``initial_lr`` × ``lr_scale`` (the warmup and schedule multiplier, `minsota.optim.lr_multiplier`).

    ``loss_fn`` computes a micro-batch's loss terms (``model.losses``, its DDP wrapper ``loss_module``, or either
    compiled): the objective is ``loss`` plus ``aux_loss`` when components contribute auxiliary terms;
    ``grad_clip`` 0 clips nothing; ``document`` passes document ids (document packing);
    ``autocast`` is the precision context (none: fp32); ``stop_requested()`` is asked once the micro-batches are done (a signal received during the step counts).
    """
    model, optimizer, scaler = state.model, state.optimizer, state.scaler
    autocast = autocast or contextlib.nullcontext()
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_scale
    totals = {}  # each loss term's mean over the micro-batches: the LM loss, and any auxiliary ones
    for micro_step in range(accum):
        with gradient_sync(loss_module, model, micro_step == accum - 1):
            with autocast:
                losses = micro_loss(loss_fn, next(state.batches), device, document)
            objective = losses["loss"] + losses["aux_loss"] if "aux_loss" in losses else losses["loss"]
            scaler.scale(objective / accum).backward()
        for name, value in losses.items():
            totals[name] = totals.get(name, 0) + value.detach().float() / accum
    # One all-reduce: the global batch's mean loss terms, and whether any rank was asked to stop (every rank then
    # stops together). torch.full, not torch.tensor(value, device=cuda): a host-to-device copy syncs (pytorch#120996).
    *reduced, asked = mean_over_ranks(
        torch.stack([*totals.values(), torch.full((), float(stop_requested()), device=device)])
    )
    totals = dict(zip(totals, reduced, strict=True))
    scaler.unscale_(optimizer)  # (fp16) clip and check the true gradients
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf, foreach=True)
    if isinstance(grad_norm, DTensor):  # FSDP2: already the global norm, as a replicated DTensor
        grad_norm = grad_norm.full_tensor()
    *values, norm_value, asked_value = torch.stack([*totals.values(), grad_norm, asked]).tolist()  # the one sync
    aux = dict(zip(totals, values, strict=True))
    loss_value = aux.pop("loss")
    # fp16's scaler skips inf/NaN gradients by itself (and lowers the scale); anything else diverged
    finite = math.isfinite(loss_value) and (math.isfinite(norm_value) or scaler.is_enabled())
    if finite:
        scaler.step(optimizer)
    scaler.update()
    if hasattr(model, "after_optimizer_step"):  # modules acting on the step: MoE bias balancing (minsota.hookspecs)
        with torch.no_grad():  # applied: the parameters moved (not when the scaler skipped an fp16 overflow)
            model.after_optimizer_step(finite and math.isfinite(norm_value))
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_value, norm_value, finite, asked_value > 0, aux)
