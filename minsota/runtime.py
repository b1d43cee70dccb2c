"""What running a model needs on a device: the device itself, the C allocator's setting, precision and autocast,
the matmul rate MFU is measured against, and the mean loss over held-out batches. The trainer and
`minsota.inference` both use it.
"""

import collections
import contextlib
import ctypes
import functools
import os
import platform
import sys
import time

import torch
from torch import nn

from minsota.distributed import mean_over_ranks
from minsota.errors import UserError
from minsota.loss import chunk_rows


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


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt's parameters, from glibc's <malloc.h>


def keep_allocations_in_heap() -> bool:
    """On glibc Linux, make the C allocator keep freed memory for the next allocation; True if it did.

    glibc serves every block over 32 MiB (its largest mmap threshold) with a fresh ``mmap`` and unmaps it when
    freed, and trims the heap's free top back to the kernel: a training step that allocates the same large
    tensors every step (logits, their gradients, d weight) page-faults them in again each time (a (2048, 32000)
    fp32 GEMM ran at 155 GF/s into a fresh tensor, 190 into a reused one: `benchmarks/README.md`).
    ``M_MMAP_MAX = 0`` puts large blocks in the heap and ``M_TRIM_THRESHOLD = -1`` never trims it (mallopt(3)),
    as ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...`` would: the resident size then
    stays at its peak. Applies to what is allocated later, in this process and in the processes it forks (data
    workers); a no-op where the user set glibc's malloc tunables themselves, with ``MINSOTA_MALLOC=default``
    (the opt-out), and off glibc (musl, macOS, Windows). CUDA memory is not glibc's and is unaffected.
    """
    if os.environ.get("MINSOTA_MALLOC", "").strip().lower() == "default":
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)  # the process's own C library
    return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1


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
    of what this device's GEMM really reaches (a datasheet peak, as in PaLM's MFU, gives a lower figure:
    `datasheet_flops`). Random operands (constant ones draw less power and run faster on a GPU) from a
    private generator, so measuring never shifts the RNG training draws from; on CUDA a size and a window
    (~50 large GEMMs) long enough for the clocks to settle.
    """
    n, reps = (8192, 50) if device.type == "cuda" else (1024, 8)
    a, b = _operands((n, n, n), device, dtype)
    for _ in range(2):
        a @ b
    # the fastest of three: a rate measured while others load the machine is too low
    best = min(_seconds(lambda: [a @ b for _ in range(reps)], device) for _ in range(3))
    return 2 * n**3 * reps / best


def gemm_shapes(model: nn.Module, rows: int) -> collections.Counter:
    """The (m, k, n) matmuls a training step of ``model`` runs on ``rows`` tokens, with how often: every Linear's
    forward (rows, in) @ (in, out) and its two backward products (d input, d weight); the output head, which
    the fused loss (`minsota.loss`) runs over row chunks, at its chunk's rows. Attention's own products and
    modules without Linears (grouped experts) are left out."""
    shapes = collections.Counter()
    head = getattr(model, "output", None)
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        m = rows if module is not head else chunk_rows(module.weight, rows)
        k, n = module.in_features, module.out_features
        for shape in ((m, k, n), (m, n, k), (n, m, k)):  # y = x Wᵀ, d x = d y W, d W = d yᵀ x (as autograd)
            shapes[shape] += -(-rows // m)  # the head: once per chunk
    return shapes


def gemm_flops(shapes: collections.Counter, device: torch.device, dtype: torch.dtype, repeats: int = 3) -> float:
    """FLOP/s of the matmuls ``shapes`` ((m, k, n) -> how many, e.g. `gemm_shapes`): each shape on random
    operands (as `peak_flops`), the fastest of ``repeats`` runs after one that warms up, weighted by its count.
    One shape's operands at a time: a 7B model's shapes together would hold GBs just before training starts.
    Beside `peak_flops`' square matmul, the rate a model's own GEMMs reach (narrow or short ones run below it);
    each run of every shape costs about 1/count of a step's matmul time."""
    seconds = 0.0
    for shape, count in shapes.items():
        a, b = _operands(shape, device, dtype)
        a @ b
        seconds += count * min(_seconds(lambda a=a, b=b: a @ b, device) for _ in range(repeats))
    return gemm_flop_count(shapes) / seconds


def gemm_flop_count(shapes: collections.Counter) -> int:
    """The FLOPs of the matmuls ``shapes`` ((m, k, n) -> how many): 2·m·k·n each."""
    return sum(2 * m * k * n * count for (m, k, n), count in shapes.items())


def _operands(shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype):
    m, k, n = shape
    generator = torch.Generator(device=device).manual_seed(0)  # private: the training RNG is left alone
    return (
        torch.randn((m, k), device=device, generator=generator).to(dtype),
        torch.randn((k, n), device=device, generator=generator).to(dtype),
    )


def _seconds(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' datasheets, FLOP/s; the first name that
# occurs in the device's name wins, so the specific variants come before the family.
DATASHEET_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("MI300X", 1307e12),
]


def datasheet_flops(device_name: str, dtype: torch.dtype | None) -> float | None:
    """The datasheet's dense bf16/fp16 peak of the device named ``device_name`` (``torch.cuda.get_device_name``),
    for MFU as published figures quote it (PaLM, Chowdhery et al. 2022, appendix B); None for other dtypes
    and devices not in the table."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    return next((flops for name, flops in DATASHEET_FLOPS if name in device_name), None)


def micro_loss(loss_fn, batch: dict, device: torch.device, document: bool):
    """``loss_fn`` (`Decoder.losses`, maybe wrapped: the loss terms by name) on one micro-batch. Document ids go
    to the model only under document packing (attention stays inside a document); under causal packing the
    data's positions simply run 0..T-1 in every window."""
    tokens, targets, positions, document_ids = (
        batch[key].to(device, non_blocking=True) for key in ("tokens", "targets", "positions", "document_ids")
    )
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
