"""Train step: tokens/s, MFU and peak memory of a whole step, minsota against Hugging Face Llama, in one run.

A step is `minsota.step.train_step`, the one the trainer runs: forward and loss (`Decoder.losses`, its fused
linear + cross-entropy), backward, gradient clipping, the finiteness check, the trainer's own optimizer
(`minsota.optim.build_optimizer`: fused AdamW over its parameter groups), zero_grad.
The peer is transformers' `LlamaForCausalLM` (attn_implementation="sdpa") holding the same weights (exported
by `minsota.hf.save_hf`; nothing is downloaded) and stepped the same way; the first loss of both must agree.

Cases: eager (minsota eager against HF eager) and compile (minsota's loss under torch.compile(fullgraph=True),
against HF eager and HF compiled). In both, the same model with a plain dict in place of the TensorDict state
runs in the same rounds: "TD overhead" is how much slower the TensorDict version is. MFU divides model FLOPs
by the fp32 (CUDA: bf16) matmul rate `minsota.runtime.peak_flops` measures, re-measured every round; "MFU own
GEMMs" by the rate of the model's own matmul shapes (`minsota.runtime.gemm_shapes`: every Linear forward and
backward, the head at the loss's chunk rows), measured in the same rounds. Peak
memory: the live parameters and optimizer state plus the largest net allocation within a step (CPU: from the
profiler's allocation events; CUDA: the allocator's peak above what was held). Where the time goes: one more step of each
side under the profiler (`op_seconds`): the GEMMs' share of the op time, the rate they reach inside the step
(the model's GEMM FLOPs over their time) and the time of everything else (norms, RoPE, activations, the
loss's softmax, attention, the optimizer).

Sizes: CPU fp32 sota-2024 shrunk to vocab 32000, dim 384, 6 layers, 6 heads / 2 KV, batch 8 x 256 (the
issue's targets are set there); CUDA sota-2024 itself (~153M parameters) in bf16, batch 16 x 1024; --smoke:
vocab 512, dim 64, 2 layers, batch 2 x 32.

A layered case runs beside it: gemma-3-1b's layout (local/global layers, QK-norm, sandwich norms, GeGLU) at
the same sizes, against transformers' Gemma3ForCausalLM. Compiled, two more steps must not recompile.
"""

import functools
import itertools
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from unittest import mock

import pytest
import torch
import transformers
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import minsota.model
from minsota.hf import save_hf
from minsota.loader import load_recipe
from minsota.loss import chunk_rows, linear_cross_entropy
from minsota.model import build_model
from minsota.optim import build_optimizer, build_scaler
from minsota.runtime import gemm_flop_count, gemm_flops, gemm_shapes, peak_flops
from minsota.state import DOCUMENT_IDS, EMBEDDINGS, HIDDEN, POSITIONS
from minsota.step import train_step
from minsota.train_state import TrainState

from harness import TOLERANCE, Setting, interleaved, parity

SIZES = {  # recipe overrides
    "smoke": {
        "model.vocab_size": 512,
        "model.dim": 64,
        "model.n_layers": 2,
        "model.n_heads": 4,
        "model.n_kv_heads": 2,
        "model.max_seq_len": 32,
        "train.seq_len": 32,
        "train.micro_batch_size": 2,
    },
    "cpu": {
        "model.vocab_size": 32000,
        "model.dim": 384,
        "model.n_layers": 6,
        "model.n_heads": 6,
        "model.n_kv_heads": 2,
        "model.max_seq_len": 256,
        "train.seq_len": 256,
        "train.micro_batch_size": 8,
    },
    "cuda": {},
}


def plain_state(hidden, positions, document_ids=None):
    """The block state as a plain dict of tensors: what the TensorDict is measured against."""
    state = {HIDDEN: hidden, EMBEDDINGS: hidden, POSITIONS: positions}
    if document_ids is not None:
        state[DOCUMENT_IDS] = document_ids
    return state


@dataclass(frozen=True)
class Trainee:
    """A model, the function computing its loss and its optimizer, stepped by the trainer's `train_step` (one
    micro-batch). `dataclasses.replace(trainee, loss_fn=...)` steps the same model and optimizer another way."""

    state: TrainState
    loss_fn: Callable
    recipe: object
    setting: Setting

    @classmethod
    def build(cls, model: nn.Module, loss_fn, recipe, setting: Setting) -> "Trainee":
        device = next(model.parameters()).device  # the trainer's optimizer and (fp16-only) scaler
        state = TrainState(model, build_optimizer(model, recipe.train), build_scaler(device, None), None)
        return cls(state, loss_fn, recipe, setting)

    def step(self, batch: dict):
        self.state.batches = itertools.repeat(batch)
        t = self.recipe.train
        train_step(
            self.state,
            self.loss_fn,
            1.0,
            device=self.setting.device,
            grad_clip=t.grad_clip,
            autocast=self.setting.autocast(),
        )

    def live_bytes(self) -> int:
        """Bytes held between steps: parameters, buffers and optimizer state (gradients are freed)."""
        model, optimizer = self.state.model, self.state.optimizer
        state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in [*model.parameters(), *model.buffers(), *state]
        }
        return sum(storages.values())


def peak_bytes(trainee: Trainee, batch) -> int:
    """Peak memory of one step: what the trainee keeps between steps plus the largest net allocation within one
    (`step_peak`; on CUDA the allocator's peak above what was held, so the peer model beside it is not counted)."""
    return trainee.live_bytes() + step_peak(lambda: trainee.step(batch), trainee.setting)


RECIPES = ["sota-2024", "gemma-3-1b"]


def layered(recipe_name: str, overrides: dict) -> dict:
    """``overrides`` for the layered recipe (Gemma 3's layout: 5 local : 1 global, a RoPE θ each): head_dim from
    the shape, Gemma's 6·dim feed-forward, the window a quarter of the sequence, the √dim embedding scale
    Gemma's HF class computes; with fewer than 6 layers (smoke) local and global alternate, so that a global
    layer is among them."""
    if recipe_name == "sota-2024":
        return overrides
    dim, seq_len = overrides.get("model.dim", 768), overrides.get("train.seq_len", 1024)
    if overrides.get("model.n_layers", 6) < 6:
        overrides = {**overrides, "model.layer_pattern": ["local", "global"]}
    return {
        **overrides,
        "model.head_dim": dim // overrides.get("model.n_heads", 12),
        "model.ffn_dim": 6 * dim,
        "model.layer_types.local.attention.window": seq_len // 4,
        "model.embed_scale": dim**0.5,
        "model.max_seq_len": seq_len,
    }


def pair(recipe_name: str, overrides: dict, setting: Setting, directory) -> tuple:
    """(recipe, minsota Decoder, the HF model with the same weights (exported to ``directory``), a batch)."""
    recipe = load_recipe(recipe_name, overrides)
    torch.manual_seed(0)
    model = build_model(recipe)  # built and exported on the CPU, then both moved
    transformers.utils.logging.disable_progress_bar()
    hf = transformers.AutoModelForCausalLM.from_pretrained(save_hf(model, directory), attn_implementation="sdpa")
    model, hf = model.to(setting.device), hf.to(setting.device)
    t = recipe.train
    return recipe, model, hf, micro_batch(recipe.model.vocab_size, t.micro_batch_size, t.seq_len, setting.device)


def micro_batch(vocab_size: int, B: int, T: int, device: torch.device) -> dict:
    """B x T random tokens, as `minsota.data` makes micro-batches."""
    tokens = torch.randint(0, vocab_size, (B, T + 1), device=device)
    positions = torch.arange(T, device=device).expand(B, T)
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "targets": tokens[:, 1:].contiguous(),
        "positions": positions,
        "document_ids": torch.zeros_like(positions),
    }


@pytest.fixture(params=RECIPES)
def models(request, setting, tmp_path):
    """(recipe, minsota Decoder, the HF model with the same weights, a batch), fresh for each case: Llama for
    sota-2024, Gemma 3 for the layered gemma-3-1b."""
    return pair(request.param, layered(request.param, SIZES[setting.size_key]), setting, tmp_path)


def hf_loss(hf):
    """HF's loss, as the terms `Decoder.losses` returns (`train_step` takes those)."""

    def loss(tokens, targets, positions, document_ids=None):  # targets are next tokens: HF must not shift them
        return {"loss": hf(input_ids=tokens, labels=targets, shift_labels=targets, position_ids=positions).loss}

    return loss


def on_plain_state(loss_fn):
    """``loss_fn`` with the decoder building a plain dict where it builds the TensorDict. Compiled, dynamo guards
    on the global it reads, so this runs a graph of its own, traced with the dict."""

    def loss(*batch):
        with mock.patch.object(minsota.model, "make_state", plain_state):
            return loss_fn(*batch)

    return loss


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_train_step(benchmark, record, setting, models, mode):
    recipe, model, hf, batch = models
    ours, theirs = Trainee.build(model, model.losses, recipe, setting), Trainee.build(hf, hf_loss(hf), recipe, setting)
    peers = {"hf_eager": theirs}
    if mode == "compile":
        ours = replace(ours, loss_fn=torch.compile(model.losses, fullgraph=True))  # a graph break fails here
        peers["hf_compile"] = replace(theirs, loss_fn=hf_loss(torch.compile(hf)))
    peers["plain_state"] = replace(ours, loss_fn=on_plain_state(ours.loss_fn))
    with setting.autocast():  # with autograd on, as in a step: the graph compiled here is the one timed
        inputs = batch["tokens"], batch["targets"], batch["positions"]
        figures = parity(
            ours.loss_fn(*inputs)["loss"],
            peers["hf_eager"].loss_fn(*inputs)["loss"],
            TOLERANCE[setting.dtype],
            f"first loss ({mode}) vs HF",
        )
    rates, own_rates, own_shapes = [], [], gemm_shapes(model, batch["tokens"].numel())

    def measure_matmul():  # the trainer's MFU denominator (uncached) and the model's own GEMMs, every round
        rates.append(peak_flops.__wrapped__(setting.device, setting.dtype))
        own_rates.append(gemm_flops(own_shapes, setting.device, setting.dtype, repeats=1))

    timing = interleaved(
        benchmark,
        setting,
        lambda: ours.step(batch),
        {"matmul": measure_matmul, **{name: lambda t=t: t.step(batch) for name, t in peers.items()}},
    )
    peak, hf_peak = peak_bytes(ours, batch), peak_bytes(peers[f"hf_{mode}"], batch)
    figures |= {"peak_mb": peak / 2**20, "vs_hf_peak": peak / hf_peak}
    gemm_flop = gemm_flop_count(own_shapes)  # HF's GEMMs: the same FLOPs
    for prefix, trainee in (("", ours), ("hf_", peers[f"hf_{mode}"])):
        gemm_s, other_s = op_seconds(lambda t=trainee: t.step(batch), setting)
        figures |= {
            f"{prefix}gemm_share": gemm_s / (gemm_s + other_s),
            f"{prefix}gemm_gflops_in_step": gemm_flop / gemm_s / 1e9,
            f"{prefix}other_ms": other_s * 1e3,
        }
    if timing:
        seconds, tokens = timing["ms"] / 1e3, batch["tokens"].numel()
        flops = model.flops_per_token(recipe.train.seq_len) * tokens
        figures |= {
            "ms": timing["ms"],
            "tokens_per_s": tokens / seconds,
            "mfu": flops / seconds / statistics.median(rates),
            "matmul_gflops": statistics.median(rates) / 1e9,
            "mfu_own_gemms": flops / seconds / statistics.median(own_rates),
            "own_gemm_gflops": statistics.median(own_rates) / 1e9,
            "td_overhead": 1 / timing["plain_state"] - 1,
            **{f"vs_{name}": timing[name] for name in peers if name.startswith("hf_")},
        }
    if mode == "compile":  # the next steps reuse the graph: nothing in a step changes a guard
        with torch._dynamo.config.patch(error_on_recompile=True):
            ours.step(batch)
            ours.step(batch)
    record(**figures)


@pytest.mark.parametrize("mode", ["eager", "compile"])
def test_loss_chunks(benchmark, record, setting, mode):
    """The fused loss alone (forward and backward) at the train step's head shape, with its chunk from
    `minsota.loss.chunk_rows`' memory budget, against fixed 256-row chunks (the constant it replaced) and the
    unfused ``F.cross_entropy(hidden @ weight.T)``, in the same rounds; peak bytes of each from the profiler."""
    sizes = SIZES[setting.size_key]
    rows = sizes.get("train.micro_batch_size", 16) * sizes.get("train.seq_len", 1024)
    vocab, dim = sizes.get("model.vocab_size", 50304), sizes.get("model.dim", 768)
    generator = torch.Generator(device=setting.device).manual_seed(0)
    hidden = torch.randn(rows, dim, device=setting.device, generator=generator, requires_grad=True)
    weight = (0.02 * torch.randn(vocab, dim, device=setting.device, generator=generator)).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), device=setting.device, generator=generator)
    variants = {
        "budget": linear_cross_entropy,
        "chunk_256": functools.partial(linear_cross_entropy, chunk_size=256),
        "unfused": lambda h, w, t: nn.functional.cross_entropy((h @ w.T).float(), t),
    }
    if mode == "compile":
        variants = {name: torch.compile(fn, fullgraph=True) for name, fn in variants.items()}

    def step(fn):
        def run():
            with setting.autocast():
                loss = fn(hidden, weight, targets)
            loss.backward()
            hidden.grad = weight.grad = None

        return run

    with setting.autocast():
        figures = parity(
            variants["budget"](hidden, weight, targets),
            variants["unfused"](hidden, weight, targets),
            TOLERANCE[setting.dtype],
            f"fused loss ({mode}) vs unfused",
        )
    runs = {name: step(fn) for name, fn in variants.items()}
    timing = interleaved(benchmark, setting, runs["budget"], {name: runs[name] for name in ("chunk_256", "unfused")})
    peaks = {name: step_peak(run, setting) for name, run in runs.items()}
    figures |= {
        "rows": chunk_rows(weight, rows),
        "peak_mb": peaks["budget"] / 2**20,
        "vs_256_peak": peaks["budget"] / peaks["chunk_256"],
        "vs_unfused_peak": peaks["budget"] / peaks["unfused"],
    }
    if timing:
        figures |= {"ms": timing["ms"], "vs_chunk_256": timing["chunk_256"], "vs_unfused": timing["unfused"]}
    record(**figures)


GEMM_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}


def op_seconds(run, setting: Setting) -> tuple[float, float]:
    """(seconds in GEMMs, seconds in everything else) of one ``run``: the profiler's self time per op (CUDA: on
    the device), the GEMMs by op name; inductor's generated kernels count under the compiled graph that calls
    them, flash attention's products under its own op (not a GEMM). The shares, not the absolute times, are
    the figure: profiling slows the small ops most."""
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if setting.cuda else [])]
    with profile(activities=activities) as prof:
        run()
        setting.sync()
    ops = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU]  # the kernels' rows: counted by op
    times = {e.key: e.self_device_time_total if setting.cuda else e.self_cpu_time_total for e in ops}
    gemm = sum(t for key, t in times.items() if key in GEMM_OPS)
    assert gemm > 0, f"no GEMM op ({', '.join(sorted(GEMM_OPS))}) in the profile: {sorted(times)[:20]}"
    return gemm / 1e6, (sum(times.values()) - gemm) / 1e6


def step_peak(run, setting: Setting) -> int:
    """The largest net allocation while ``run`` runs (CUDA: the allocator's peak above what was held)."""
    if setting.cuda:
        held = torch.cuda.memory_allocated(setting.device)
        torch.cuda.reset_peak_memory_stats(setting.device)
        run()
        return torch.cuda.max_memory_allocated(setting.device) - held
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return max([0, *itertools.accumulate(nbytes for _, nbytes in events)])  # + an allocation, - a free
