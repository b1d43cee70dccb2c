"""What readies minsota for GPUs and scale, checked where a CPU can: the MFU denominators (measured without
touching the training RNG; the datasheet table), activation checkpointing (same losses, lower peak)."""

import os
import platform
import subprocess
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from minsota.loader import load_recipe
from minsota.model import build_model
from minsota.recompute import MODES, checkpoint_activations
from minsota.runtime import datasheet_flops, gemm_flops, gemm_shapes, keep_allocations_in_heap, peak_flops


def test_measuring_the_matmul_rate_leaves_the_training_rng_alone():
    peak_flops.cache_clear()
    before = torch.get_rng_state()
    assert peak_flops(torch.device("cpu"), torch.float32) > 1e9
    assert torch.equal(torch.get_rng_state(), before)


def test_the_models_own_gemms_are_each_linear_forward_and_backward_and_the_head_per_chunk():
    model = build_model(load_recipe("tiny", {"model.vocab_size": 1000}))  # no Linear of the layers is as wide
    rows, (vocab, dim) = 1024, model.output.weight.shape
    shapes = gemm_shapes(model, rows)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.output]
    assert (rows, dim, vocab) not in shapes and shapes[(256, dim, vocab)] == 4  # the loss's 256-row chunks
    assert shapes[(vocab, 256, dim)] == 4  # d weight, once per chunk
    assert sum(shapes.values()) == 3 * (len(linears) + 4)
    before = torch.get_rng_state()
    rate = gemm_flops(shapes, torch.device("cpu"), torch.float32, repeats=1)
    assert rate > 1e9 and torch.equal(torch.get_rng_state(), before)


def test_datasheet_peaks_name_the_variant_before_the_family():
    assert datasheet_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert datasheet_flops("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert datasheet_flops("NVIDIA A100-SXM4-80GB", torch.float16) == 312e12
    assert datasheet_flops("NVIDIA A10G", torch.bfloat16) == 70e12
    assert datasheet_flops("NVIDIA L40S", torch.bfloat16) == 362e12
    assert datasheet_flops("NVIDIA A100-SXM4-80GB", None) is None  # fp32: no tensor-core figure to compare with
    assert datasheet_flops("Some Future GPU", torch.bfloat16) is None


def step_peak(recipe, batch) -> tuple[float, int]:
    """(loss, peak bytes allocated during forward + backward on CPU, from the profiler's allocation events)."""
    torch.manual_seed(0)
    model = build_model(recipe)
    checkpoint_activations(model, recipe.train.activation_checkpointing)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = model.loss(*batch)
        loss.backward()
    current = highest = 0
    for _, nbytes in sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    ):
        current += nbytes
        highest = max(highest, current)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return loss.item(), highest, grads


def test_activation_checkpointing_keeps_the_losses_and_lowers_the_peak():
    settings = {"model.n_layers": 6, "model.max_seq_len": 256, "train.seq_len": 256}
    tokens = torch.randint(0, 256, (4, 257), generator=torch.Generator().manual_seed(1))
    batch = (tokens[:, :-1], tokens[:, 1:])
    results = {
        mode: step_peak(load_recipe("tiny", {**settings, "train.activation_checkpointing": mode}), batch)
        for mode in MODES
    }
    (loss, peak, grads) = results["none"]
    for mode in ("full", "selective"):
        assert results[mode][0] == loss and torch.equal(results[mode][2], grads), mode  # recomputed bit for bit
    assert results["full"][1] < results["selective"][1] < peak, {m: r[1] for m, r in results.items()}


def test_alibi_score_mod_matches_its_dense_bias():
    """CUDA's flex path takes ALiBi as a score_mod; its forward (which flex also runs on a CPU) matches SDPA with
    the dense (B, H, T, T) bias the CPU path builds, under document masking."""
    from minsota.builtins.attention import flex_attend, visible_keys
    from minsota.builtins.positional import ALiBi

    recipe = load_recipe("tiny", {"model.positional": "alibi"})
    alibi = ALiBi(recipe.model)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 32, 16, generator=gen) for _ in range(3))
    document_ids = torch.tensor([[0] * 20 + [1] * 12, [0] * 7 + [1] * 25])
    positions = torch.arange(32).expand(2, 32) - torch.where(document_ids == 1, torch.tensor([20, 7])[:, None], 0)
    mask = visible_keys(32, document_ids, 0, q.device)
    dense = alibi.bias(positions, 4).masked_fill(~mask, float("-inf"))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    got = flex_attend(q, k, v, document_ids, 0, alibi.score_mod(positions))
    assert (got - want).abs().max() < 1e-5, f"max abs diff {(got - want).abs().max():.3g}"


HEAP_PROBE = """
import ctypes
from minsota.runtime import keep_allocations_in_heap

class Mallinfo2(ctypes.Structure):  # glibc's struct mallinfo2; hblks counts the mmapped blocks
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype = Mallinfo2, ctypes.c_void_p

def mapped_by_a_large_block():
    before = libc.mallinfo2().hblks
    libc.malloc(ctypes.c_size_t(64 << 20))  # over glibc's largest mmap threshold (32 MiB)
    return libc.mallinfo2().hblks - before

print(mapped_by_a_large_block(), keep_allocations_in_heap(), mapped_by_a_large_block())
"""


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_the_trainers_allocator_setting_keeps_large_blocks_in_the_heap():
    environment = {k: v for k, v in os.environ.items() if k not in ("MINSOTA_MALLOC", "GLIBC_TUNABLES")}
    run = subprocess.run([sys.executable, "-c", HEAP_PROBE], env=environment, capture_output=True, text=True)
    assert run.stdout.split() == ["1", "True", "0"], run.stderr  # mmapped before, in the heap after


@pytest.mark.parametrize("name, value", [("MINSOTA_MALLOC", "default"), ("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")])
def test_the_allocator_is_left_alone_when_the_user_says_so(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert keep_allocations_in_heap() is False
