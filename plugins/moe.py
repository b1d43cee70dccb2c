"""The `moe` feed-forward: a dropless mixture of SwiGLU experts (Shazeer et al. 2017; Switch, Fedus et al. 2021,
https://arxiv.org/abs/2101.03961; Mixtral, https://arxiv.org/abs/2401.04088; DeepSeek-V3,
https://arxiv.org/abs/2412.19437).

Options (keys of the ``model.feedforward`` inline table):
  experts = 8, top_k = 2     routed experts and how many each token reaches (dropless: every token reaches all k)
  expert_dim                 each routed expert's hidden width (default: swiglu's, ``model.ffn_dim`` or 8/3·dim)
  shared_experts = 0         always-on experts (DeepSeek, Qwen 2): one SwiGLU of ``shared_experts·shared_dim``
  shared_dim                 a shared expert's width (default: expert_dim)
  score = "softmax"          router scores: softmax over the experts (Mixtral, OLMoE, Qwen) or "sigmoid" (V3)
  normalize_top_k = true     rescale the chosen k scores to sum to 1 (false: OLMoE)
  route_scale = 1.0          the routed output's factor (DeepSeek-V3's routed_scaling_factor, 2.5)
  groups = 1, top_groups = 1 group-limited routing (DeepSeek-V3: 8 groups, 4 kept, each scored by its 2 best)
  balance = "aux"            "aux": the Switch load-balancing loss E·Σ f_e·P_e, times ``balance_coef`` (0.01), an
                             auxiliary term `moe_balance_loss`; "bias": DeepSeek-V3's auxiliary-loss-free balancing,
                             an expert bias added to the scores for selection only and moved by ``bias_rate``
                             (1e-3) towards balance after each optimizer step; "none"
  router_z_loss = 0.0        ST-MoE's router z-loss coefficient (Zoph et al. 2022, https://arxiv.org/abs/2202.08906),
                             the auxiliary term `router_z_loss`
  dispatch = "grouped"       "grouped": tokens sorted by expert and one grouped matmul (`F.grouped_mm`) per weight;
                             "loop": the same sorted tokens, one matmul per expert (eager only: data-dependent
                             sizes). "grouped" falls back to "loop" where torch has no grouped matmul.

The router runs in fp32 under autocast (its top-k must not flip with the precision). Experts are 3-D weights
``w13`` (E, 2·expert_dim, dim: gate rows then up rows) and ``w2`` (E, dim, expert_dim), the layout Hugging Face
v5 stores (``experts.gate_up_proj``, ``experts.down_proj``). The grouped matmul needs rows 16-byte aligned:
dim and expert_dim multiples of 4 (fp32) or 8 (bf16); others take the loop.

Bias balancing updates ``expert_bias`` (a buffer: saved and resumed with the weights, never given a gradient)
from the tokens each expert received during the whole optimizer step, summed over micro-batches and all-reduced
over ranks, through the `after_optimizer_step` seam (`minsota.hookspecs`, "After the optimizer step").

Every forward also records ``aux_metric`` (`moe_imbalance`): the max/mean tokens per routed expert of that
micro-batch (1 = perfectly balanced), which metrics.jsonl logs averaged over MoE layers, micro-batches and ranks.
No expert parallelism: under DDP and FSDP2 every rank holds (or shards) all experts.
"""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minsota import hookimpl

NATIVE_GROUPED_MM = getattr(F, "grouped_mm", None)


# torch's grouped matmul runs fp32 in eager on CPU, but its meta (compile-time) kernel accepts bf16 alone, as the
# CUDA kernel does. An fp32 grouped matmul therefore goes through these two opaque ops, which compile calls as they
# are: the product of expert e's rows with b[e] (M, K) x (E, K, N) -> (M, N), and its weight gradient. Off the CPU
# (where the kernel is bf16-only) they loop over the experts inside the op, still opaque to compile.
@torch.library.custom_op("minsota::grouped_mm", mutates_args=())
def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    if a.device.type == "cpu":
        return NATIVE_GROUPED_MM(a, b, offs=offsets)
    return torch.cat([rows @ b[e] for e, rows in enumerate(_by_expert(a, offsets))])


@torch.library.custom_op("minsota::grouped_mm_weight_grad", mutates_args=())
def _grouped_mm_weight_grad(a: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor, experts: int) -> torch.Tensor:
    """(E, K, N): expert e's aᵀ·grad over its rows (zero for an expert without tokens)."""
    if a.device.type == "cpu":
        return NATIVE_GROUPED_MM(a.t(), grad, offs=offsets)
    return torch.stack([x.t() @ g for x, g in zip(_by_expert(a, offsets), _by_expert(grad, offsets))])


def _by_expert(rows: torch.Tensor, offsets: torch.Tensor):
    ends = offsets.tolist()
    return rows.tensor_split(ends[:-1])


@_grouped_mm.register_fake
def _(a, b, offsets):
    return a.new_empty(a.shape[0], b.shape[-1])


@_grouped_mm_weight_grad.register_fake
def _(a, grad, offsets, experts):
    return a.new_empty(experts, a.shape[1], grad.shape[1])


def _grouped_mm_backward(ctx, grad):
    a, b, offsets = ctx.saved_tensors
    grad = grad.contiguous()  # the kernel refuses zero strides (a broadcast gradient)
    return _grouped_mm(grad, b.transpose(1, 2), offsets), _grouped_mm_weight_grad(a, grad, offsets, b.shape[0]), None


def _save(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


_grouped_mm.register_autograd(_grouped_mm_backward, setup_context=_save)


def grouped_mm(a, b, offsets):
    """(M, K) rows sorted by expert x (E, K, N) -> (M, N); ``offsets`` (E,) int32: the end of each expert's rows."""
    if a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16:
        return NATIVE_GROUPED_MM(a, b, offs=offsets)
    return _grouped_mm(a, b, offsets)


def route(m, x):
    """(N, D) tokens -> fp32 logits (N, E), top-k weights (N, k) and expert ids (N, k): scores from fp32 logits,
    the k best after the selection bias (and within the best groups), weights from the unbiased scores."""
    with torch.autocast(x.device.type, enabled=False):
        logits = x.float() @ m.router.weight.float().T  # (N, E)
        scores = logits.softmax(-1) if m.score == "softmax" else logits.sigmoid()
        choice = scores + m.expert_bias if m.balance == "bias" else scores
        if m.groups > 1:  # keep the experts of the top_groups groups whose two best scores sum highest
            grouped = choice.unflatten(-1, (m.groups, -1))  # (N, G, E/G)
            best = grouped.topk(2, dim=-1).values.sum(-1).topk(m.top_groups, dim=-1).indices  # (N, top_groups)
            keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter(1, best, True)  # (N, G)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        experts = choice.topk(m.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(1, experts)
        if m.normalize_top_k:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return logits, weights * m.route_scale, experts


def swiglu(x, w13, w2):
    """w2(silu(x·gate) * x·up) for (M, D) tokens of one expert (or a shared one): w13 (2I, D), w2 (D, I)."""
    gate, up = (x @ w13.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2.T


def reference_route(m, x):
    """`route` restated: explicit softmax / sigmoid, choices by a descending sort rather than top-k."""
    logits = x.double() @ m.router.weight.double().T
    scores = torch.exp(logits - logits.max(-1, keepdim=True).values)
    scores = scores / scores.sum(-1, keepdim=True) if m.score == "softmax" else 1 / (1 + torch.exp(-logits))
    choice = scores + m.expert_bias.double() if m.balance == "bias" else scores
    if m.groups > 1:
        grouped = choice.reshape(len(x), m.groups, -1)
        group_score = grouped.sort(-1, descending=True).values[..., :2].sum(-1)  # (N, G): each group's best two
        kept = group_score.argsort(-1, descending=True)[:, : m.top_groups]
        hidden = torch.ones_like(group_score, dtype=torch.bool)
        hidden[torch.arange(len(x))[:, None], kept] = False
        choice = grouped.masked_fill(hidden[..., None], float("-inf")).reshape(len(x), -1)
    experts = choice.argsort(-1, descending=True)[:, : m.top_k]
    weights = scores[torch.arange(len(x))[:, None], experts]
    if m.normalize_top_k:
        weights = weights / weights.sum(-1, keepdim=True)
    return (weights * m.route_scale).to(x.dtype), experts


def moe_reference(m, x):
    """Every token through each of its experts one by one, weighted, from a restated routing (`reference_route`)."""
    flat = x.reshape(-1, x.shape[-1])
    with torch.autocast(x.device.type, enabled=False):
        weights, experts = reference_route(m, flat)
    y = torch.zeros_like(flat)
    for e in range(m.n_experts):
        chosen = experts == e  # (N, k)
        rows = chosen.any(-1).nonzero().flatten()
        weight = (weights * chosen).sum(-1)[rows, None]
        y = y.index_add(0, rows, weight * swiglu(flat[rows], m.w13[e], m.w2[e]))
    if m.shared is not None:
        y = y + swiglu(flat, m.shared.w13.weight, m.shared.w2.weight)
    return y.view(x.shape)


class MoE(nn.Module):
    """Routed (and shared) SwiGLU experts; the expert loop over a per-token routing is its reference."""

    reference = staticmethod(moe_reference)
    aux_metric_name = "moe_imbalance"

    def __init__(
        self,
        cfg,
        experts: int = 8,
        top_k: int = 2,
        expert_dim: int | None = None,
        shared_experts: int = 0,
        shared_dim: int | None = None,
        score: str = "softmax",
        normalize_top_k: bool = True,
        route_scale: float = 1.0,
        groups: int = 1,
        top_groups: int = 1,
        balance: str = "aux",
        balance_coef: float = 0.01,
        bias_rate: float = 1e-3,
        router_z_loss: float = 0.0,
        dispatch: str = "grouped",
    ):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError(f"top_k must be in 1..experts ({experts}), got {top_k}")
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")
        if balance not in ("aux", "bias", "none"):
            raise ValueError(f"balance must be 'aux', 'bias' or 'none', got {balance!r}")
        if dispatch not in ("grouped", "loop"):
            raise ValueError(f"dispatch must be 'grouped' or 'loop', got {dispatch!r}")
        if experts % groups or not 1 <= top_groups <= groups or (groups > 1 and top_groups * experts // groups < top_k):
            raise ValueError(
                f"groups ({groups}) must divide experts ({experts}) and keep >= top_k experts in "
                f"top_groups ({top_groups})"
            )
        if min(balance_coef, bias_rate, router_z_loss) < 0:
            raise ValueError("balance_coef, bias_rate and router_z_loss must be >= 0")
        E, D = self.n_experts, self.dim = experts, cfg.dim
        I = self.expert_dim = expert_dim or cfg.ffn_width(8 / 3)  # noqa: E741  (the dense SwiGLU's width)
        self.top_k, self.score, self.normalize_top_k, self.route_scale = top_k, score, normalize_top_k, route_scale
        self.groups, self.top_groups, self.balance = groups, top_groups, balance
        self.balance_coef, self.bias_rate, self.z_coef = balance_coef, bias_rate, router_z_loss
        aligned = D % 8 == 0 and I % 8 == 0  # 16-byte rows in fp32 and bf16
        self.dispatch = "grouped" if dispatch == "grouped" and NATIVE_GROUPED_MM is not None and aligned else "loop"
        self.router = nn.Linear(D, E, bias=False)
        self.w13 = nn.Parameter(torch.empty(E, 2 * I, D))
        self.w2 = nn.Parameter(torch.empty(E, D, I))
        self.shared = None
        if shared_experts:
            width = shared_experts * (shared_dim or I)
            self.shared = nn.ModuleDict(
                {"w13": nn.Linear(D, 2 * width, bias=False), "w2": nn.Linear(width, D, bias=False)}
            )
        # the selection bias (saved with bias balancing; zero and unsaved otherwise) and the tokens each expert
        # received since the last optimizer step (never saved: a step starts at zero)
        self.register_buffer("expert_bias", torch.zeros(E), persistent=balance == "bias")
        self.register_buffer("tokens_per_expert", torch.zeros(E), persistent=False)
        self.aux_loss_name = {"aux": "moe_balance_loss"}.get(balance)
        self.z_loss = RouterZLoss() if router_z_loss else None
        self.init_weights(
            cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
        )  # usable alone (the decoder re-inits)

    @torch.no_grad()
    def init_weights(self, std: float, residual_std: float):
        for weight in (self.router.weight, self.w13, *([self.shared.w13.weight] if self.shared else [])):
            nn.init.normal_(weight, 0.0, std)
        for weight in (self.w2, *([self.shared.w2.weight] if self.shared else [])):
            nn.init.normal_(weight, 0.0, residual_std)

    def forward(self, x):
        shape, x = x.shape, x.reshape(-1, x.shape[-1])  # (N, D)
        logits, weights, experts = route(self, x)
        flat = experts.flatten()  # (N·k,) token t's j-th choice at t·k + j
        counts = torch.zeros(self.n_experts, device=x.device).index_add_(
            0, flat, torch.ones_like(flat, dtype=torch.float)
        )
        order = flat.argsort(stable=True)  # the assignments sorted by expert
        token = order // self.top_k
        routed = (self.grouped if self.dispatch == "grouped" else self.looped)(x[token], counts)  # (N·k, D)
        routed = routed * weights.flatten()[order, None].to(routed.dtype)
        y = torch.zeros_like(x, dtype=routed.dtype).index_add_(0, token, routed)
        if self.shared is not None:
            y = y + swiglu(x, self.shared.w13.weight, self.shared.w2.weight)
        self._account(logits, counts)
        return y.view(shape)

    def grouped(self, x, counts):
        """Sorted tokens (M, D) -> (M, D): one grouped matmul per weight, expert e taking its ``counts[e]`` rows."""
        offsets = counts.cumsum(0).to(torch.int32)
        device = x.device.type  # autocast has no rule for grouped matmuls: cast to its dtype here
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x, w13, w2 = x.to(dtype), self.w13.to(dtype), self.w2.to(dtype)
        gate, up = grouped_mm(x, w13.transpose(1, 2), offsets).chunk(2, dim=-1)  # (M, I) each
        return grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offsets)

    def looped(self, x, counts):
        """As `grouped`, one matmul per expert over its slice (data-dependent sizes: eager only)."""
        chunks = x.split(counts.long().tolist())
        return torch.cat([swiglu(chunk, self.w13[e], self.w2[e]) for e, chunk in enumerate(chunks)])

    def _account(self, logits, counts):
        """The auxiliary terms, the load-imbalance metric and, for bias balancing, the step's token counts."""
        mean = counts.mean()
        self.aux_metric = (counts.max() / mean).detach()
        if self.balance == "aux":  # Switch: E · Σ_e (fraction of assignments to e) · (mean router probability of e)
            probs = logits.softmax(-1) if self.score == "softmax" else torch.sigmoid(logits)
            probs = probs / probs.sum(-1, keepdim=True)
            self.aux_loss = self.balance_coef * self.n_experts * (counts / counts.sum() * probs.mean(0)).sum()
        if self.z_loss is not None:
            self.z_loss.aux_loss = self.z_coef * torch.logsumexp(logits, dim=-1).square().mean()
        if self.balance == "bias" and self.training:
            self.tokens_per_expert.add_(counts)

    @torch.no_grad()
    def after_optimizer_step(self, applied: bool):
        """DeepSeek-V3 §2.1.2: each expert's bias moves by ``bias_rate`` towards balance, b_e += rate·sign(mean -
        load_e), the load summed over the step's micro-batches and ranks. A skipped step moves nothing."""
        if self.balance != "bias":
            return
        load = self.tokens_per_expert
        if dist.is_initialized():
            dist.all_reduce(load)
        if applied:
            self.expert_bias.add_(self.bias_rate * torch.sign(load.mean() - load))
        load.zero_()

    def active_parameters(self) -> int:
        """The parameters one token uses: the router, its top_k experts and the shared ones."""
        per_expert = self.w13[0].numel() + self.w2[0].numel()
        shared = sum(p.numel() for p in self.shared.parameters()) if self.shared is not None else 0
        return self.router.weight.numel() + self.top_k * per_expert + shared

    def flops_per_token(self, seq_len: int) -> float:
        """2 per active weight (the router, top_k routed experts, the shared experts)."""
        return 2.0 * self.active_parameters()


class RouterZLoss(nn.Module):
    """Holds the router z-loss term of its MoE (a module of its own: one auxiliary term per name)."""

    aux_loss_name = "router_z_loss"


def moe(cfg, **options) -> MoE:
    """Mixture of SwiGLU experts: top-k routing (softmax or sigmoid), shared experts, aux-loss or bias balancing."""
    return MoE(cfg, **options)


@hookimpl
def minsota_register_feedforwards():
    return {"moe": moe}
