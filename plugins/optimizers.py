"""Built-in optimizers, each ``factory(groups, cfg, **options) -> torch.optim.Optimizer`` (see the hookspec).

- ``adamw``: AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101), β and ε from ``[train]``, fused kernels on
  CPU and CUDA (22 ms vs foreach 93 ms a step on this CPU).
- ``muon``: Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/; Liu et al. 2025, "Muon is
  Scalable for LLM Training", arXiv:2502.16982) for role ``matrix``, AdamW for the rest, in one optimizer.
  The Muon step is `torch.optim.Muon`'s (momentum EMA, Nesterov, 5 quintic Newton–Schulz steps in bf16, its
  lr adjustment), applied to each logical matrix a fused weight declares in its group's ``splits`` (q, k, v
  of ``wqkv``; w1, w3 of ``w13``), as modded-nanogpt keeps them separate; under FSDP2 each matrix is
  gathered whole for it.
- ``lion``: Lion (Chen et al. 2023, arXiv:2302.06675): the sign of an interpolated momentum.
- ``schedulefree-adamw``: Schedule-Free AdamW (Defazio et al. 2024, arXiv:2405.15682) from the
  ``schedulefree`` package (``pip install 'minsota[schedulefree]'``); pair it with ``train.schedule =
  "constant"``. It uses the trainer's optional-method seam: ``train()``/``eval()`` around evaluation,
  checkpoints and sampling, and ``group_state_keys`` for the counters it keeps in its parameter groups.
"""

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from minsota import hookimpl


def _fused(groups) -> bool:
    return all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])


def _number(key: str, value, ok, what: str) -> None:
    """A numeric option's value, checked (the recipe's validation reports the ValueError naming the key)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise ValueError(f"{key} must be {what}, got {value!r}")


def adamw(groups, cfg, fused: bool | None = None):
    """AdamW with the recipe's betas and eps; fused on CPU and CUDA."""
    if fused is not None and not isinstance(fused, bool):
        raise ValueError(f"fused must be true or false, got {fused!r}")
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=_fused(groups) if fused is None else fused
    )


class MuonAdamW(torch.optim.AdamW):
    """Muon for the groups with ``algorithm = "muon"``, AdamW for the others; one state, one state dict."""

    def __setstate__(self, state):  # AdamW's reads every parameter's "step"; Muon's parameters have none
        torch.optim.Optimizer.__setstate__(self, state)

    @torch.no_grad()
    def step(self, closure=None):
        # fused AdamW takes the GradScaler's contract (`_step_supports_amp_scaling`): the scaler hands over
        # `found_inf` (skip the step: fp16 overflowed) and `grad_scale` (divide the gradients by it) instead of
        # stepping only finite steps itself. The Muon half keeps the same contract (one sync, fp16 only).
        found_inf, grad_scale = getattr(self, "found_inf", None), getattr(self, "grad_scale", None)
        overflowed = found_inf is not None and bool(found_inf.item())
        for group in [g for g in self.param_groups if g["algorithm"] == "muon" and not overflowed]:
            for p, splits in zip(group["params"], group["splits"]):
                if p.grad is not None:
                    grad = p.grad if grad_scale is None else p.grad / grad_scale
                    buffer = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                    _muon_step(p, grad, buffer, splits or [p.shape[0]], group)
        everything = self.param_groups
        self.param_groups = [g for g in everything if g["algorithm"] != "muon"]
        try:
            return super().step(closure)
        finally:
            self.param_groups = everything


def newton_schulz(update: torch.Tensor, coefficients: tuple, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """The quintic Newton-Schulz iteration towards the nearest semi-orthogonal matrix, `torch.optim.Muon`'s op for
    op (bit for bit in bf16, its dtype), in ``dtype``: fp32 removes bf16's rounding of the input (2^-9 relative),
    which turns the last-bit differences of a gradient summed in another order into ~1e-4 differences of loss."""
    a, b, c = coefficients
    x = update.to(dtype)
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=1e-7)  # spectral norm <= Frobenius norm <= 1 (not in place: x may be the momentum)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _muon_step(p: torch.Tensor, grad: torch.Tensor, buffer: torch.Tensor, sizes: list[int], group: dict) -> None:
    """`torch.optim.Muon`'s step, op for op (its lr adjustment; `newton_schulz`), one logical matrix (``sizes``:
    rows) at a time. On an FSDP2 shard (a DTensor) the momentum stays sharded (it is elementwise); the update
    and the parameter are gathered whole, stepped as one process would, and each rank keeps its own rows."""
    from torch.optim._muon import _adjust_lr  # torch >= 2.9

    buffer.lerp_(grad, 1 - group["momentum"])
    update = grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer
    sharded = isinstance(p, DTensor)
    whole, target = (update.full_tensor(), p.full_tensor()) if sharded else (update, p)
    for part, param in zip(whole.split(sizes), target.split(sizes)):
        ortho = newton_schulz(part, group["ns_coefficients"], group["ns_steps"], NS_DTYPES[group["ns_dtype"]])
        param.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled weight decay with the unadjusted lr
        param.add_(ortho, alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"], part.shape))
    if sharded:
        p.to_local().copy_(distribute_tensor(target, p.device_mesh, p.placements, src_data_rank=None).to_local())


def muon(
    groups,
    cfg,
    lr: float = 0.02,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_coefficients: tuple = (3.4445, -4.775, 2.0315),
    match_rms_adamw: bool = False,
    ns_dtype: str = "bfloat16",
):
    """Muon (lr 0.02, momentum 0.95, Nesterov, 5 Newton-Schulz steps) for matrices, AdamW for the rest."""
    if not hasattr(torch.optim, "Muon"):
        raise ValueError(f"muon needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}")
    _number("lr", lr, lambda v: v > 0, "a number > 0")
    _number("momentum", momentum, lambda v: 0 <= v < 1, "a number in [0, 1)")
    _number("ns_steps", ns_steps, lambda v: isinstance(v, int) and 1 <= v < 100, "an integer in [1, 99]")
    if len(ns_coefficients) != 3:
        raise ValueError(f"ns_coefficients must be 3 numbers (a, b, c), got {ns_coefficients!r}")
    if ns_dtype not in NS_DTYPES:
        raise ValueError(f"ns_dtype must be one of {', '.join(NS_DTYPES)}, got {ns_dtype!r}")
    for group in groups:
        if group["role"] == "matrix":
            if any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon orthogonalises 2-D matrices; a 'matrix' parameter is not 2-D")
            # match_rms_adamw (Liu et al. 2025): 0.2·sqrt(max(A, B)) per matrix, so AdamW's lr carries over
            group.update(
                algorithm="muon",
                lr=group["lr"] if match_rms_adamw else lr * group["lr_scale"],
                momentum=momentum,
                nesterov=nesterov,
                ns_steps=ns_steps,
                ns_coefficients=tuple(ns_coefficients),
                ns_dtype=ns_dtype,
                adjust_lr_fn="match_rms_adamw" if match_rms_adamw else "original",
            )
        else:
            group["algorithm"] = "adamw"
    return MuonAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=_fused(groups))


class Lion(torch.optim.Optimizer):
    """Lion: p -= lr·(sign(β1·m + (1-β1)·g) + λ·p); then m = β2·m + (1-β2)·g (Chen et al. 2023, Algorithm 2)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                momentum = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                update = momentum.lerp(p.grad, 1 - beta1).sign_()
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"])
                momentum.lerp_(p.grad, 1 - beta2)
        return loss


def lion(groups, cfg, lr: float | None = None, beta1: float = 0.9, beta2: float = 0.99):
    """Lion; lr defaults to train.lr / 3, and weight decay grows as lr shrinks (lr·λ stays AdamW's, §5)."""
    lr = cfg.lr / 3 if lr is None else lr
    _number("lr", lr, lambda v: v > 0, "a number > 0")
    for key, beta in (("beta1", beta1), ("beta2", beta2)):
        _number(key, beta, lambda v: 0 <= v < 1, "a number in [0, 1)")
    for group in groups:
        group.update(lr=lr * group["lr_scale"], weight_decay=group["weight_decay"] * cfg.lr / lr)
    return Lion(groups, lr=lr, betas=(beta1, beta2))


def schedulefree_adamw(groups, cfg, warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0):
    """Schedule-Free AdamW (the schedulefree package); use with train.schedule = "constant"."""
    _number("warmup_steps", warmup_steps, lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
    _number("r", r, lambda v: v >= 0, "a number >= 0")
    _number("weight_lr_power", weight_lr_power, lambda v: v >= 0, "a number >= 0")
    try:
        import schedulefree
    except ImportError:
        raise ValueError(
            "schedulefree-adamw needs the schedulefree package: pip install 'minsota[schedulefree]'"
        ) from None
    optimizer = schedulefree.AdamWScheduleFree(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        warmup_steps=warmup_steps,
        r=r,
        weight_lr_power=weight_lr_power,
    )
    # what it counts in its groups as it trains: restored on resume, while the recipe's hyperparameters win
    optimizer.group_state_keys = ("k", "train_mode", "weight_sum", "lr_max", "scheduled_lr")
    return optimizer


@hookimpl
def minsota_register_optimizers():
    return {"adamw": adamw, "muon": muon, "lion": lion, "schedulefree-adamw": schedulefree_adamw}
