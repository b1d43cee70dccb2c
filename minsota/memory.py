"""The memory a training run needs on one device, estimated from the meta-device model before anything is
allocated, and the memory the device has: `minsota.train` refuses a run that cannot fit (unless
``train.check_memory = false``) and `minsota show` prints both, with what the estimate assumed.

What is counted, per device: fp32 weights and their fp32 gradients (8 bytes a parameter), the optimizer's state
as measured: ``train.optimizer``'s own factory (a plugin's too, with no code of its own) built on one small
stand-in tensor per role and stepped once, its state tensors' bytes per parameter times the model's parameters
of that role (AdamW 8, Lion 4, Muon 4 for matrices and AdamW's 8 for the rest; FSDP2 divides weights, gradients
and state by the world size). Then the activations autograd keeps for the backward of one micro-batch: the
input and output of every Linear, of every norm and of the token embedding, at the autocast dtype's width
(Korthikanti et al. 2022, arXiv:2205.05198 §4, count the same tensors, for a GPT layer ~34·s·b·h bytes in
16-bit), the (T, T) scores of attention kernels that materialise them (``math``, and document masks off CUDA),
and the fused LM-head loss's gradient buffers (minsota.loss: d hidden and d head in fp32, one (chunk, vocab)
block at a time, its rows as `minsota.loss.chunk_rows` picks them on the device), plus one layer's activations again for the gradients of them that the backward holds. With
``train.activation_checkpointing`` (minsota.recompute) a block keeps only its fp32 input (``full``) or that
and its matmuls' and attention kernel's outputs (``selective``), and one block is recomputed at a time in
backward. Not counted: the allocator's slack and one op's temporaries. Measured on the 2-core CPU (fp32, the
growth of peak resident memory over two real training steps): the estimate was 0.67-0.68x of it for `tiny`
(0.85M parameters, 8 x 64 and 8 x 512 tokens), 0.89x at 55M, 1.08x at 110M parameters and 0.93x with the
`math` kernel at T = 512 (dim 256; AdamW and Muon alike), 0.83x there with ``selective`` and 0.74x with
``full`` checkpointing. A run is refused only when the estimate alone exceeds what the device has.
"""

import os
from dataclasses import dataclass

import torch
from torch import nn

from minsota.errors import UserError
from minsota.loss import chunk_rows
from minsota.model import build_model
from minsota.optim import optimizer_over, parameter_roles, train_mode
from minsota.recipe import Recipe, component, stand_in_groups

GIB = 2**30


@dataclass
class Estimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    tokens: str  # the micro-batch the activations are for, "B x T"
    optimizer_name: str
    state_per_parameter: float  # the optimizer's measured bytes of state per parameter (all roles)
    checkpointing: str  # train.activation_checkpointing

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def __str__(self) -> str:
        parts = (self.weights, self.gradients, self.optimizer, self.activations)
        return (
            f"{gib(self.total)} (weights {gib(parts[0])}, gradients {gib(parts[1])}, {self.optimizer_name} state "
            f"{gib(parts[2])} at {self.state_per_parameter:.3g} B/parameter, activations {gib(parts[3])} at "
            f"{self.tokens} tokens per micro-batch with activation checkpointing {self.checkpointing})"
        )


def gib(n: float) -> str:
    """Bytes in binary units: MiB below a GiB, TiB from 1024 GiB."""
    unit, scale = next((u, f) for u, f in (("TiB", 2**40), ("GiB", GIB), ("MiB", 2**20)) if n >= f or u == "MiB")
    return f"{n / scale:.3g} {unit}"


def state_per_parameter(recipe: Recipe) -> dict[str, float]:
    """Role -> the bytes of optimizer state per parameter that ``train.optimizer`` keeps, measured: the real
    factory (a plugin's too) built on `minsota.recipe.stand_in_groups` and stepped once. Per-tensor scalars
    (a step count) are left out; state that grows slower than its tensor (a factored second moment) is
    overcounted at the stand-ins' small shapes."""
    optimizer = optimizer_over(stand_in_groups(recipe.train), recipe.train, recipe.plugins)
    train_mode(optimizer)
    optimizer.step()
    per_role = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {}).values()
            kept = sum(v.numel() * v.element_size() for v in state if isinstance(v, torch.Tensor) and v.ndim > 0)
            per_role[group["role"]] = kept / p.numel()
    return per_role


def estimate(recipe: Recipe, model: nn.Module, activation_bytes: int, world: int = 1, cuda: bool = False) -> Estimate:
    """What training ``model`` (built on "meta") needs on one device, a GPU if ``cuda``; ``activation_bytes``: 2
    under bf16/fp16 autocast, 4 in fp32."""
    t = recipe.train
    params = sum(p.numel() for p in model.parameters())
    shard = world if t.parallelism == "fsdp" else 1
    per_role, sizes = state_per_parameter(recipe), dict(model.named_parameters())
    state = sum(sizes[name].numel() * per_role.get(role, 0.0) for name, role in parameter_roles(model).items())
    return Estimate(
        4 * params // shard,
        4 * params // shard,
        int(state) // shard,
        _activations(recipe, model, activation_bytes, cuda),
        f"{t.micro_batch_size} x {t.seq_len}",
        component(t.optimizer)[0],
        state / params,
        t.activation_checkpointing,
    )


def _activations(recipe: Recipe, model: nn.Module, activation_bytes: int, cuda: bool) -> int:
    """What autograd keeps for one micro-batch's backward (see the module docstring), per block as
    ``train.activation_checkpointing`` decides."""
    t, cfg = recipe.train, model.cfg
    tokens, mode = t.micro_batch_size * t.seq_len, t.activation_checkpointing
    blocks = [_kept(block, cfg.dim) for block in model.layers]  # per token: (everything, matmul/attention outputs)
    outside = _kept(model, cfg.dim)[0] - sum(every for every, _ in blocks)  # the embedding, the final norm
    one_layer = max(every for every, _ in blocks)  # one block's tensors again: the backward's gradients of them
    if mode == "none":
        kept = sum(every for every, _ in blocks) + one_layer
    else:  # a block's input (the fp32 residual stream), what selective keeps, and one block recomputed
        inputs = len(blocks) * cfg.dim * 4 / activation_bytes
        kept = inputs + (sum(costly for _, costly in blocks) if mode == "selective" else 0) + 2 * one_layer
    activations = tokens * (outside + kept) * activation_bytes
    activations += _scores(recipe, model, activation_bytes)
    vocab, dim = model.output.weight.shape
    chunk = chunk_rows(model.output.weight, tokens, cuda)
    return int(activations + 4 * (tokens * dim + vocab * dim + 2 * chunk * vocab))  # the fused loss's


def _kept(module: nn.Module, dim: int) -> tuple[int, int]:
    """Per token, the elements autograd keeps inside ``module``: every Linear's input and output and every norm's
    (and the embedding's, if inside); and of them the outputs of the costly ops selective checkpointing saves
    (matmuls, and an attention kernel's output, ~dim)."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear) and m is not getattr(module, "output", None)]
    norms = sum(1 for m in module.modules() if _is_norm(m)) + sum(isinstance(m, nn.Embedding) for m in module.modules())
    every = sum(m.in_features + m.out_features for m in linears) + 2 * dim * norms
    return every, sum(m.out_features for m in linears) + dim * hasattr(module, "attention")


def _is_norm(module: nn.Module) -> bool:
    return type(module).__name__.lower().endswith("norm") or isinstance(module, (nn.LayerNorm, nn.RMSNorm))


def _scores(recipe: Recipe, model: nn.Module, activation_bytes: int) -> int:
    """(B, H, T, T) attention scores and weights, kept for backward by kernels that materialise them."""
    cfg, t = model.cfg, recipe.train
    document = recipe.data.packing == "document" and not _cuda(t.device)
    # per layer: layers may differ in their attention (model.layer_types)
    dense = sum(document or component(spec["attention"])[0] == "math" for spec in model.specs)
    # scores and weights per dense layer (selective keeps the scores, a matmul's, and recomputes the weights; full
    # recomputes both), and in backward one layer's pair again for their gradients (and recomputed, if it was)
    one = min(dense, 1)
    kept = {"none": 2 * dense + 2 * one, "selective": dense + 3 * one, "full": 4 * one}[t.activation_checkpointing]
    return kept * t.micro_batch_size * cfg.n_heads * t.seq_len**2 * activation_bytes


def _cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def available(device: torch.device) -> tuple[int, str]:
    """(bytes free for this run, what they are) on ``device``: CUDA's free memory, or the RAM the kernel
    reports as available (MemAvailable: free plus reclaimable caches) shared by this machine's ranks."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {device}"
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        free = kib * 1024
    except (OSError, StopIteration, ValueError):  # not Linux: free pages as the C library sees them
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    share = f", shared by {local_ranks} ranks" if local_ranks > 1 else ""
    return free // local_ranks, f"available RAM{share}"


def check(recipe: Recipe, device: torch.device, dtype: torch.dtype | None, world: int = 1) -> None:
    """Refuse, before the model is built, a run whose estimate exceeds what ``device`` has (train.check_memory)."""
    if not recipe.train.check_memory:
        return
    need = estimate(recipe, build_model(recipe, "meta"), 4 if dtype is None else 2, world, device.type == "cuda")
    have, what = available(device)
    if need.total > have:
        raise UserError(
            f"{recipe.name} needs ~{need} on {device}, more than its {gib(have)} {what}: shrink "
            f"model.* or train.micro_batch_size, or set train.check_memory = false to try anyway"
        )


def summary(recipe: Recipe) -> str:
    """The estimate on the recipe's own device and what that device has (`minsota show`)."""
    from minsota.runtime import autocast_dtype, resolve_device

    device = resolve_device(recipe.train.device)
    dtype = autocast_dtype(recipe.train.precision, device)
    need = estimate(recipe, build_model(recipe, "meta"), 4 if dtype is None else 2, cuda=device.type == "cuda")
    have, what = available(device)
    return f"~{need} to train on {device}; it has {gib(have)} {what}"
