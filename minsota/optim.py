"""Optimization: the learning-rate schedule, AdamW's parameter groups, and the optimizer and loss scaler that
the trainer builds (and `benchmarks/bench_train_step.py` times), from one place so the two cannot drift.

Optimization, every number a recipe key: AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101) with
β = (0.9, 0.95) and weight decay on matrices only, never norms, gains or biases (GPT-3, Llama); gradient
clipping at 1.0; warmup (linear, cosine or none), then cosine decay to 10% of peak (Chinchilla, Hoffmann et
al. 2022, arXiv:2203.15556) or warmup-stable-decay (Hu et al. 2024, arXiv:2404.06395) with the 1-sqrt
cooldown of Hägele et al. 2024 (arXiv:2405.18392), or constant. bf16 autocast and TF32 matmuls on CUDA;
fp32 on CPU, where bf16 is emulated and 2.4-3.9x slower; fp16 brings a dynamic loss scaler.
"""

import math

import torch
from torch import nn

from minsota.recipe import TrainConfig


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


def build_optimizer(model: nn.Module, t: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over `param_groups` with the recipe's betas and eps (the lr is set per step from `lr_at`)."""
    return torch.optim.AdamW(param_groups(model, t), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                             fused=device.type in ("cpu", "cuda"))  # fused: 22 ms vs foreach 93 ms on CPU


def build_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """fp16's dynamic loss scaler; a no-op for every other precision."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
