"""Attention: every registered kernel (as the recipe builds it) and the raw flash/flex kernels, against math.

test_attention: each kernel in the attention registry, causal, document-masked (a packed row of four documents)
    and sliding-window (T/4), forward and forward+backward: speed-up over the registered `math` kernel and
    parity (output and every gradient) with `minsota.reference.attention`. `sdpa` runs inside
    ``sdpa_kernel([FLASH_ATTENTION])``, so a fall-back to another SDPA backend raises instead of being
    timed (CUDA's masked cases go through flex_attention, which that context does not govern).
test_kernel: the bare kernels on (B, H, T, hd) tensors, causal: SDPA's flash backend and flex_attention
    (compiled; forward only on CPU, whose flex has no backward) against SDPA's math backend.

Sizes: CPU fp32, 6 heads / 2 KV of 64, T 256-2048; CUDA bf16, 12 / 4 heads, T 1024-8192; --smoke: T 64.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from minsota import load_plugins, reference
from minsota.builtins.attention import flex_attend
from minsota.errors import UserError
from minsota.loader import load_recipe
from minsota.model import build_model

from harness import TOLERANCE, interleaved, parity, size_key, speed, worst

BASELINE = "math"
BACKENDS = {"sdpa": [SDPBackend.FLASH_ATTENTION]}  # the only SDPA backend each kernel may run on
MASKS = ["causal", "document", "window"]
PASSES = ["fwd", "fwd+bwd"]
SIZES = {  # shape of one attention layer and the sequence lengths
    "smoke": dict(dim=64, heads=4, kv_heads=2, seq_lens=[64]),
    "cpu": dict(dim=384, heads=6, kv_heads=2, seq_lens=[256, 512, 1024, 2048]),
    "cuda": dict(dim=768, heads=12, kv_heads=4, seq_lens=[1024, 2048, 4096, 8192]),
}


def sizes(config) -> dict:
    return SIZES[size_key(config.getoption("--smoke"))]


def pytest_generate_tests(metafunc):
    if "seq_len" in metafunc.fixturenames:
        metafunc.parametrize("seq_len", sizes(metafunc.config)["seq_lens"])


def packed(T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, document_ids), each (1, T): four documents of T/8, 3T/8, T/4 and T/4 tokens."""
    starts = torch.zeros(T, dtype=torch.long, device=device)
    starts[[T // 8, T // 2, 3 * T // 4]] = 1
    document_ids = starts.cumsum(0)
    first = torch.searchsorted(document_ids, document_ids)  # index of each token's document start
    return (torch.arange(T, device=device) - first)[None], document_ids[None]


def attention_layer(request, setting, name: str, mask: str, T: int):
    """The attention module a recipe with this kernel builds (one layer of the benchmark's shape)."""
    size = sizes(request.config)
    spec = {"name": name, "window": T // 4} if mask == "window" else name
    try:
        recipe = load_recipe(
            "sota-2024",
            {
                "model.dim": size["dim"],
                "model.n_heads": size["heads"],
                "model.n_kv_heads": size["kv_heads"],
                "model.n_layers": 1,
                "model.max_seq_len": T,
                "model.attention": spec,
            },
        )
        torch.manual_seed(0)
        return build_model(recipe, setting.device).layers[0].attention
    except UserError as e:  # a plugin kernel without this option: nothing to measure
        pytest.skip(str(e))


def restricted(name: str):
    return sdpa_kernel(BACKENDS[name]) if name in BACKENDS else contextlib.nullcontext()


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("name", load_plugins().registry("attention").list())
def test_attention(request, benchmark, record, setting, name, mask, seq_len, pass_):
    module = attention_layer(request, setting, name, mask, seq_len)
    torch.manual_seed(1)
    x = torch.randn(1, seq_len, module.wo.out_features, device=setting.device, requires_grad=True)
    if mask == "document":
        positions, document_ids = packed(seq_len, setting.device)
    else:
        positions, document_ids = torch.arange(seq_len, device=setting.device)[None], None
    backward = pass_ == "fwd+bwd"

    def run(layer, kernel):
        def step():
            with restricted(kernel), setting.autocast(), torch.set_grad_enabled(backward):
                y = layer(x, positions, document_ids)
            if backward:
                torch.autograd.grad(y, [x, *layer.parameters()], torch.ones_like(y))

        return step

    figures = {"backend": "flash only" if name in BACKENDS else ""}
    if reference.of(module) is not None:
        figures |= attention_parity(module, name, x, positions, document_ids, backward, setting)
    baseline = attention_layer(request, setting, BASELINE, mask, seq_len) if name != BASELINE else None
    peers = {} if baseline is None else {BASELINE: run(baseline, BASELINE)}
    timing = interleaved(benchmark, setting, run(module, name), peers)
    record(**figures, **speed(timing, BASELINE if peers else None))


def attention_parity(module, name, x, positions, document_ids, backward, setting) -> dict:
    """Output (and with ``backward`` every gradient) of ``module`` against its fp32 reference."""
    tolerance = TOLERANCE[setting.dtype]
    with restricted(name), setting.autocast():
        actual = module(x, positions, document_ids)
    expected = reference.call(module, x, positions, document_ids)
    figures = [parity(actual, expected.to(actual.dtype), tolerance, f"attention {name} output")]
    if backward:
        leaves = dict(module.named_parameters(), x=x)
        cotangent = torch.randn_like(expected)
        grads = torch.autograd.grad(actual, list(leaves.values()), cotangent.to(actual.dtype))
        expected_grads = torch.autograd.grad(expected, list(leaves.values()), cotangent)
        figures += [
            parity(a, e, tolerance, f"attention {name} gradient of {leaf}")
            for leaf, a, e in zip(leaves, grads, expected_grads)
        ]
    return worst(*figures)


# ------------------------------------------------------------------------------------------- bare kernels


def sdpa(backend):
    def kernel(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    return kernel


KERNELS = {
    "flash": lambda: sdpa(SDPBackend.FLASH_ATTENTION),
    "flex": lambda: torch.compile(lambda q, k, v: flex_attend(q, k, v, None, 0), fullgraph=True),
}


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernel(request, benchmark, record, setting, kernel, seq_len, pass_):
    backward = pass_ == "fwd+bwd"
    if kernel == "flex" and backward and not setting.cuda:
        pytest.skip("flex_attention has no backward on CPU in this torch")
    size = sizes(request.config)
    head_dim = size["dim"] // size["heads"]
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(
            1, heads, seq_len, head_dim, device=setting.device, dtype=setting.dtype, requires_grad=backward
        )  # CPU flex refuses inputs that require grad
        for heads in (size["heads"], size["kv_heads"], size["kv_heads"])
    )
    fast, baseline = KERNELS[kernel](), sdpa(SDPBackend.MATH)

    def run(fn):
        def step():
            with torch.set_grad_enabled(backward):
                y = fn(q, k, v)
            if backward:
                torch.autograd.grad(y, [q, k, v], torch.ones_like(y))

        return step

    with torch.set_grad_enabled(backward):
        actual, expected = fast(q, k, v), baseline(q.float(), k.float(), v.float())
    figures = [parity(actual, expected.to(actual.dtype), TOLERANCE[setting.dtype], f"{kernel} output")]
    if backward:
        cotangent = torch.randn_like(expected)
        grads = torch.autograd.grad(actual, [q, k, v], cotangent.to(actual.dtype))
        expected_grads = torch.autograd.grad(expected, [q, k, v], cotangent)
        figures += [
            parity(a, e, TOLERANCE[setting.dtype], f"{kernel} gradient of {name}")
            for name, a, e in zip("qkv", grads, expected_grads)
        ]
    timing = interleaved(benchmark, setting, run(fast), {"math": run(baseline)})
    record(**worst(*figures), **speed(timing, "math", "sdpa math"))
