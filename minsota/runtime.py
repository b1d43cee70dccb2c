"""What running a model needs on a device: the device itself, precision and autocast, the matmul rate MFU is
measured against, and the mean loss over held-out batches. The trainer and `minsota.inference` both use it.
"""

import contextlib
import functools
import math
import time

import torch

from minsota.distributed import mean_over_ranks
from minsota.errors import UserError


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


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """The autocast context for ``dtype`` on ``device`` (`autocast_dtype`), a no-op context for plain fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


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


def micro_loss(loss_fn, batch: dict, device: torch.device, document: bool):
    """``loss_fn`` (`Decoder.losses`, maybe wrapped: the loss terms by name) on one micro-batch. Document ids go
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
        # through `losses`, the method FSDP2 gathers parameters around; the validation loss is its LM loss alone
        loss = torch.stack([micro_loss(model.losses, batch, device, document)["loss"] for batch in batches]).mean()
    model.train()
    return mean_over_ranks(loss).item()
