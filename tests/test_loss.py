"""The fused linear + cross-entropy (`minsota.loss`) against plain F.cross_entropy on materialised logits."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from minsota.loader import load_recipe
from minsota.loss import chunk_rows, linear_cross_entropy, softcap
from minsota.model import build_model

TOL = 1e-5  # fp32


def plain_cross_entropy(logits, targets, z_loss=0.0):
    """The unfused definition: F.cross_entropy plus PaLM's z-loss over the same (non-ignored) targets."""
    valid = (targets != -100).float()
    z = (torch.logsumexp(logits, dim=-1).square() * valid).sum() / valid.sum().clamp_min(1)
    return F.cross_entropy(logits, targets, ignore_index=-100) + z_loss * z


def plain_loss(hidden, weight, targets, logit_softcap=0.0, z_loss=0.0):
    return plain_cross_entropy(softcap((hidden @ weight.T).float(), logit_softcap), targets, z_loss)


def inputs(n=37, dim=16, vocab=101, ignored=(0, 5, 36), seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, dim, generator=gen).mul_(0.5).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[list(ignored)] = -100
    return hidden, weight, targets


def assert_close(name, got, want):
    diff = (got - want).abs()
    assert diff.max() <= TOL, f"{name}: max abs diff {diff.max():.3g}, mean {diff.mean():.3g} (tolerance {TOL})"


def loss_and_grads(fn, hidden, weight, targets, scale=1.0, **kwargs):
    loss = fn(hidden, weight, targets, **kwargs)
    return (loss, *torch.autograd.grad(loss * scale, (hidden, weight)))


@pytest.mark.parametrize("chunk_size", [1, 8, 37, 64])  # uneven last chunk, one chunk, chunk > rows
@pytest.mark.parametrize("logit_softcap,z_loss", [(0.0, 0.0), (0.0, 1e-2), (3.0, 0.0), (3.0, 1e-2)])
def test_fused_matches_plain(chunk_size, logit_softcap, z_loss):
    hidden, weight, targets = inputs()
    options = dict(logit_softcap=logit_softcap, z_loss=z_loss)
    # scale: the upstream gradient (e.g. 1/accumulation steps) must multiply the stored gradients
    want = loss_and_grads(plain_loss, hidden, weight, targets, scale=0.25, **options)
    got = loss_and_grads(linear_cross_entropy, hidden, weight, targets, scale=0.25, chunk_size=chunk_size, **options)
    for name, g, w in zip(["loss", "d hidden", "d weight"], got, want):
        assert_close(name, g, w)


def test_without_autograd_only_the_loss():
    hidden, weight, targets = inputs()
    with torch.no_grad():
        got = linear_cross_entropy(hidden, weight, targets, chunk_size=8)
        assert_close("loss", got, plain_loss(hidden, weight, targets))


def test_all_ignored_is_nan_with_zero_gradients_as_cross_entropy():
    hidden, weight, targets = inputs(n=6, ignored=range(6))
    want = loss_and_grads(plain_loss, hidden, weight, targets)
    got = loss_and_grads(linear_cross_entropy, hidden, weight, targets, chunk_size=4)
    assert want[0].isnan() and got[0].isnan()
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_a_second_backward_through_the_graph_raises():
    """backward scales the stored gradients in place; autograd's version check must refuse to reuse them."""
    hidden, weight, targets = inputs()
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace operation"):
        loss.backward()


def test_bf16_autocast_stays_close_and_keeps_gradient_dtypes():
    hidden, weight, targets = inputs()
    want = loss_and_grads(plain_loss, hidden, weight, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_and_grads(linear_cross_entropy, hidden, weight, targets, chunk_size=8)
    assert [g.dtype for g in got] == [torch.float32] * 3
    for name, g, w in zip(["loss", "d hidden", "d weight"], got, want):
        assert (g - w).abs().max() <= 3e-2 * w.abs().max(), f"{name}: max abs diff {(g - w).abs().max():.3g}"


def relative_error(got, want):
    return ((got.float() - want).norm() / want.norm()).item()


def test_fp16_autocast_gradients_do_not_underflow():
    """The gradients are made in forward, before a GradScaler's scale arrives with grad_loss: the mean's
    1/count must not reach fp16 there (softmax/count ~ 1/(count·vocab) flushes to zero in the d hidden GEMM)."""
    hidden, weight, targets = inputs(n=2048, dim=8, vocab=8192, ignored=(0, 5))
    want = loss_and_grads(plain_loss, hidden, weight, targets)
    scale = 65536.0  # GradScaler's initial scale, as minsota.train uses
    errors = {}
    for name, fn in [("plain", plain_loss), ("fused", linear_cross_entropy)]:
        with torch.autocast("cpu", dtype=torch.float16):
            got = loss_and_grads(fn, hidden, weight, targets, scale=scale)
        errors[name] = [relative_error(g / scale, w) for g, w in zip(got[1:], want[1:])]
    # plain F.cross_entropy: ~3e-4 for both; the fused loss rounding 1/count into fp16 gave 1.6e-2 for d hidden
    for i, name in enumerate(["d hidden", "d weight"]):
        assert errors["fused"][i] <= 2e-3, f"{name}: relative error {errors['fused'][i]:.3g} ({errors})"


def test_bf16_weight_gradient_is_summed_in_fp32():
    """A bf16 weight (FSDP2's param_dtype): d weight is summed over chunks in fp32 and cast once, so it is as
    close as one bf16 GEMM's (autograd's); a bf16 running sum was rounded per chunk (2.7x the error)."""
    hidden, weight, targets = inputs(n=1024, dim=32, vocab=512, ignored=(0, 5))
    want = loss_and_grads(plain_loss, hidden, weight, targets)
    low = [hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()]
    plain = loss_and_grads(plain_loss, *low, targets)
    fused = loss_and_grads(linear_cross_entropy, *low, targets, chunk_size=8)
    assert [g.dtype for g in fused[1:]] == [torch.bfloat16] * 2
    for i, name in [(1, "d hidden"), (2, "d weight")]:
        got, bound = relative_error(fused[i], want[i]), 1.5 * relative_error(plain[i], want[i])
        assert got <= bound, f"{name}: relative error {got:.3g}, plain bf16 autograd's x 1.5 = {bound:.3g}"


def test_compiles_fullgraph():
    hidden, weight, targets = inputs()
    compiled = torch.compile(linear_cross_entropy, fullgraph=True)
    options = dict(logit_softcap=3.0, z_loss=1e-2, chunk_size=16)
    got = loss_and_grads(compiled, hidden, weight, targets, **options)
    want = loss_and_grads(plain_loss, hidden, weight, targets, logit_softcap=3.0, z_loss=1e-2)
    for name, g, w in zip(["loss", "d hidden", "d weight"], got, want):
        assert_close(name, g, w)


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_decoder_loss_is_cross_entropy_of_its_logits(tie_embeddings):
    recipe = load_recipe(
        "tiny", {"model.tie_embeddings": tie_embeddings, "model.z_loss": 1e-3, "model.logit_softcap": 5.0}
    )
    torch.manual_seed(0)
    model = build_model(recipe)
    tokens = torch.randint(0, recipe.model.vocab_size, (2, 16))
    targets = tokens.roll(-1, dims=1)
    targets[:, -1] = -100

    params = list(model.parameters())
    got = model.loss(tokens, targets)
    got = [got, *torch.autograd.grad(got, params)]
    want = plain_cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), z_loss=1e-3)  # soft-capped logits
    want = [want, *torch.autograd.grad(want, params)]
    for name, g, w in zip(["loss", *(n for n, _ in model.named_parameters())], got, want):
        assert_close(name, g, w)


class GemmDtypes(TorchDispatchMode):
    """Records the operand dtypes of every matmul that runs (minsota's accumulating one is opaque to the mode)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (
            torch.ops.aten.mm.default,
            torch.ops.aten.addmm.default,
            torch.ops.minsota.accumulate_matmul.default,
        ):
            self.seen.append(tuple(a.dtype for a in args[-2:]))
        return func(*args, **(kwargs or {}))


def test_bf16_autocast_runs_every_gemm_in_bf16_and_sums_d_weight_in_fp32():
    """Under bf16 autocast the d weight GEMM takes bf16 operands too (a custom op is not autocast-eligible: it
    was an fp32 GEMM), and its fp32 sum stays within 1.5x plain bf16 autograd's relative error vs fp32."""
    hidden, weight, targets = inputs(n=1024, dim=32, vocab=512, ignored=(0, 5))
    want = loss_and_grads(plain_loss, hidden, weight, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = loss_and_grads(plain_loss, hidden, weight, targets)
        with GemmDtypes() as gemms:
            fused = loss_and_grads(linear_cross_entropy, hidden, weight, targets, chunk_size=64)
    assert len(gemms.seen) == 3 * 1024 // 64 and set(gemms.seen) == {(torch.bfloat16, torch.bfloat16)}, gemms.seen
    for i, name in [(1, "d hidden"), (2, "d weight")]:
        got, bound = relative_error(fused[i], want[i]), 1.5 * relative_error(plain[i], want[i])
        assert got <= bound, f"{name}: relative error {got:.3g}, plain bf16 autograd's x 1.5 = {bound:.3g}"


def test_chunks_are_sized_by_a_memory_budget_and_split_the_rows_evenly():
    assert chunk_rows(torch.empty(128256, 8), 2048) == 256  # at least 256 rows
    assert chunk_rows(torch.empty(32000, 384, device="meta"), 4096) == 384  # a block as large as d weight
    assert chunk_rows(torch.empty(32000, 384, device="meta"), 2048) == 352  # 6 even chunks, not 5 x 384 + 128
    assert chunk_rows(torch.empty(32000, 384, device="meta"), 100) == 100  # one chunk
    meta = torch.empty(128256, 4096, device="meta")
    assert not meta.is_cuda and chunk_rows(meta, 8192) == 4096  # the CPU's budget; CUDA's is CUDA_CHUNK_BYTES
