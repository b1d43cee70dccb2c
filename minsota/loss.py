"""The LM loss: linear head + cross-entropy fused over row chunks, so the (N, vocab) logits never exist whole.

With a 32k vocabulary the logits, their softmax and its gradient are the largest tensors of a training step
(~1 GB at 2048 tokens, ~10% of a CPU step in memory traffic). Following Liger Kernel's fused linear
cross-entropy (Hsu et al. 2024, https://arxiv.org/abs/2410.10989), the forward pass walks the rows in chunks
and, for each, computes logits -> loss and at once the gradient with respect to the logits, which it turns
into d(hidden) and accumulates into d(weight); backward only scales those by the incoming gradient (and the
mean's 1/count, kept out of forward so that fp16 does not underflow). No matmul is repeated (a
recompute-in-backward variant would redo the lm_head GEMM, the largest in the model), and only one
(chunk, vocab) block is alive at a time.

Semantics match ``F.cross_entropy(softcap(hidden @ weight.T), targets, ignore_index=-100)`` (mean over the
targets that are not -100) plus PaLM's z-loss ``z_loss · mean(logsumexp²)`` over the same targets, with
Gemma 2's logit soft-capping ``cap · tanh(logits / cap)`` before both. Logits are fp32 whatever the matmul
dtype. Everything is static-shape tensor code, so it compiles with ``fullgraph=True``.
"""

import torch

IGNORE_INDEX = -100


@torch.library.custom_op("minsota::accumulate_matmul", mutates_args=("out",))
def accumulate_matmul(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b, in place. An op of its own because torch.compile turns a plain ``addmm_`` on a tensor
    made inside the graph into a fresh (vocab, dim) buffer plus a copy per chunk (~10% of a compiled CPU step
    at vocab 32000); a custom op that declares its mutation is put back in place by inductor.

    ``out`` may be fp32 while ``a`` and ``b`` are bf16/fp16 (a low-precision weight, e.g. FSDP2's param_dtype):
    the product is then taken in their dtype (no fp32 GEMM) and added to the fp32 running sum, so only each
    chunk's contribution is rounded, never the sum. (CUDA's ``addmm(out_dtype=)`` could skip the temporary,
    but CPU has no such kernel.) On CUDA ``addmm(out_dtype=)`` takes the low-precision operands and accumulates
    in fp32 inside the GEMM; CPU adds their product to the fp32 sum (the twin the tests check against fp32)."""
    if out.dtype == a.dtype:
        out.addmm_(a, b)
    elif a.is_cuda:  # low-precision operands, fp32 accumulation in the GEMM itself
        out.copy_(torch.addmm(out, a, b, out_dtype=out.dtype))
    else:
        out.add_(a @ b)


@accumulate_matmul.register_fake
def _(out, a, b):
    return None


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """Gemma 2's final-logit soft-capping cap·tanh(logits/cap); cap 0 leaves logits unchanged."""
    return cap * torch.tanh(logits / cap) if cap else logits


def _chunk(h, weight, targets, valid, cap: float, z_loss: float, grad_hidden=None, grad_weight=None):
    """Cross-entropy and z-loss sums of one chunk of rows (weighted by ``valid``). Given gradient buffers, it
    writes d sum/d h into ``grad_hidden`` (these rows) and adds d sum/d weight into ``grad_weight``: gradients
    of the *sums*, count times the mean's (see `_fused` for why).

    One (c, V) block is alive (two under softcap): logsumexp is done by hand so that exp(logits - max)
    overwrites the logits (torch.logsumexp would allocate two more blocks), and that block then becomes the
    gradient. A function, not a loop body, so the block is freed before the next chunk allocates its own.
    """
    logits = softcap((h @ weight.T).float(), cap)  # (c, V), fp32
    target_logit = logits.gather(1, targets.clamp_min(0)[:, None]).squeeze(1)  # ignored rows read column 0
    tanh_grad = 1 - (logits / cap).square() if cap and grad_weight is not None else None  # d softcap / d logits
    top = logits.amax(dim=-1)  # (c,)
    exp = logits.sub_(top[:, None]).exp_()
    total = exp.sum(dim=-1)
    lse = top + total.log()
    ce, z = ((lse - target_logit) * valid).sum(), (lse.square() * valid).sum()
    if grad_weight is not None:
        # d(sum)/d(logits) = valid·(softmax·(1 + 2·z_loss·lse) − onehot(target)), × (1 − tanh²) under softcap
        grad = exp.mul_((valid * (1 + 2 * z_loss * lse) / total)[:, None])
        grad.scatter_add_(1, targets.clamp_min(0)[:, None], -valid[:, None])
        if cap:
            grad.mul_(tanh_grad)
        # operands in autocast's dtype when it is on (a custom op is not autocast-eligible: d weight would be an
        # fp32 GEMM), else in the weight's
        low = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else weight.dtype
        grad_hidden.copy_(grad.to(low) @ weight.to(low))
        accumulate_matmul(grad_weight, grad.T.to(low), h.to(low))
    return ce, z


def _fused(hidden, weight, targets, cap: float, z_loss: float, chunk_size: int, with_grads: bool):
    """(loss, d sum/d hidden, d sum/d weight, count) walking row chunks; the gradients are None without
    ``with_grads``. They are the gradients of the summed (not averaged) token losses: the mean's 1/count is
    left to backward, which multiplies by grad_loss / count in fp32.

    Why: these gradients are made in forward, before a GradScaler's scale (fp16) arrives with grad_loss. With
    the 1/count folded in, the (chunk, vocab) block holds softmax/count ~ 1/(count·vocab) ~ 1e-8, and under
    fp16 (autocast, or fp16 parameters) the d hidden GEMM flushes it to zero. Without it the block's entries
    are at most ~1 and d hidden's at most ~2·max|weight|, safely inside fp16's range, as autograd's would be
    with the scaler's scale; the GEMMs stay in fp16/bf16 (disabling autocast would put them in fp32, several
    times slower on the fp16-only GPUs that use fp16 at all), and bf16/fp32 results are unchanged.
    d weight is summed over chunks in fp32 (whatever the weight's dtype: a bf16 running sum would be rounded
    once per chunk) and cast to the weight's dtype once, at the end.
    """
    valid = (targets != IGNORE_INDEX).float()
    count = valid.sum()
    grad_hidden = torch.empty_like(hidden) if with_grads else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if with_grads else None  # summed in place
    ce_sum = z_sum = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        ce, z = _chunk(
            hidden[rows],
            weight,
            targets[rows],
            valid[rows],
            cap,
            z_loss,
            grad_hidden[rows] if with_grads else None,
            grad_weight,
        )
        ce_sum, z_sum = ce_sum + ce, z_sum + z
    loss = ce_sum / count + z_loss * z_sum / count.clamp_min(1)  # 0/0 = NaN when all ignored, as F.cross_entropy
    return loss, grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), count


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, cap: float, z_loss: float, chunk_size: int):
        loss, grad_hidden, grad_weight, count = _fused(
            hidden, weight, targets, cap, z_loss, chunk_size, with_grads=True
        )
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_loss.float() / count.clamp_min(1)  # the mean's 1/count, in fp32; all ignored -> zero gradients
        # scaled in place: backward starts with every activation alive, no room for a second (vocab, dim) copy.
        # A second backward through this graph (retain_graph) fails autograd's version check, never double-scales.
        return grad_hidden.mul_(scale), grad_weight.mul_(scale), None, None, None, None


CUDA_CHUNK_BYTES = 1 << 30  # the (chunk, vocab) fp32 blocks alive at once on CUDA (logits/gradient, softcap's)


def chunk_rows(weight: torch.Tensor, rows: int, cuda: bool | None = None) -> int:
    """Rows per chunk of ``rows`` rows, from a memory budget for the (chunk, vocab) fp32 block. On the CPU the
    block may be as large as the fp32 d weight sum the loss holds anyway (vocab × dim: about ``dim`` rows, at
    least 256), so the loss's working set is at most twice that (three times under softcap); the block then is
    no more than one (dim, vocab) matrix beside a step's activations (dim 384, 2,048 rows: 352-row chunks, +12 MB).
    More rows make d weight's GEMM, whose inner dimension is the chunk, run closer to the square rate (K = 256
    is the narrowest GEMM of a step; `benchmarks/README.md`). On CUDA `CUDA_CHUNK_BYTES` for both blocks (~1,000
    rows at a 128k vocabulary, ~4,000 at 32k), so the fp32 d weight sum is re-read a few times per micro-batch
    rather than dozens. The rows are then split into equal chunks (a multiple of 32): no short last chunk.
    ``cuda`` (default: where ``weight`` is) lets `minsota.memory` ask for a device its meta model is not on."""
    vocab, dim = weight.shape
    budget = CUDA_CHUNK_BYTES // 2 if (weight.is_cuda if cuda is None else cuda) else max(256, dim) * vocab * 4
    most = max(256, budget // (vocab * 4)) // 32 * 32
    chunks = -(-rows // most)
    return min(rows, -(-rows // chunks) // -32 * -32)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    logit_softcap: float = 0.0,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy (+ z-loss) of ``softcap(hidden @ weight.T)`` against ``targets``; -100 is ignored.

    hidden (N, D), weight (V, D), targets (N,) int64. The gradient of ``weight`` is summed over chunks in fp32
    and returned in ``weight``'s dtype. Without autograd (eval, no_grad) only the loss is computed, still chunk
    by chunk.
    """
    chunk_size = chunk_size or chunk_rows(weight, hidden.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, logit_softcap, z_loss, chunk_size)
    return _fused(hidden, weight, targets, logit_softcap, z_loss, chunk_size, with_grads=False)[0]
