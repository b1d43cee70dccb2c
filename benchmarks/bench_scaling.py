"""How the cost grows: tokens/s and peak memory of a training step against sequence length and model size,
minsota beside Hugging Face Llama (the same weights), eager.

A step is the train-step suite's (`bench_train_step`: `minsota.step.train_step`, fused AdamW, grad clip 1.0;
HF `LlamaForCausalLM`, sdpa). Two cases, one per axis; each point gets its own model pair (the sequence axis
shares one), one profiled step first (peak memory, and it warms up), then rounds of one minsota step and one
HF step, so each point's ratio is measured in the same rounds. Eager only: compiled, every point would be a
graph of its own (~1 min each to compile here).

- ``sequence``: T = 256 ... 4096 at 4096 tokens per step (16 x 256 ... 1 x 4096), vocab 32000, dim 256, 4
  layers, 4 heads / 2 KV of 64. Fitted: time per token = a + b·T over minsota's points (least squares); b·T is
  what grows with the length (attention's scores and values: causal attention's FLOPs per token grow with T,
  the rest does not), and T = a / b is where it would take over (half the step); attention's share of the
  FLOPs beside it (`minsota.components.attention_flops` against `Decoder.flops_per_token`). Memory per token
  = (peak − what the step keeps between steps: parameters, buffers, AdamW state) / tokens.
- ``size``: four widths and depths at 8 x 256 tokens, vocab 32000: dim 128 x 2 layers ... 512 x 8 (heads of
  64). Fitted: the power law of time per token in the parameter count (log-log least squares) and the peak's
  bytes per parameter.

Each writes a figure, ``benchmarks/scaling-sequence.png`` and ``scaling-size.png`` (tokens/s and peak MB of
both sides; under --smoke into the case's temporary directory), and prints its fit below the summary table.
Three rounds per point (fewer with --rounds); --smoke: vocab 512, tiny widths, T = 8 ... 64, one round.
"""

import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from bench_train_step import Trainee, hf_loss, micro_batch, pair, peak_bytes
from matplotlib.figure import Figure

from minsota.components import attention_flops

from harness import timed

VOCAB = {"smoke": 512, "cpu": 32000, "cuda": 32000}
SEQUENCE = {  # (model (dim, layers, heads, kv heads), tokens per step, lengths)
    "smoke": ((64, 2, 4, 2), 64, [8, 16, 32, 64]),
    "cpu": ((256, 4, 4, 2), 4096, [256, 512, 1024, 2048, 4096]),
    "cuda": ((768, 12, 12, 4), 16384, [256, 512, 1024, 2048, 4096, 8192]),
}
SIZE = {  # (models, micro-batch, sequence length)
    "smoke": ([(16, 1, 1, 1), (32, 1, 2, 1), (48, 2, 3, 1), (64, 2, 4, 2)], 2, 32),
    "cpu": ([(128, 2, 2, 1), (256, 4, 4, 2), (384, 6, 6, 2), (512, 8, 8, 2)], 8, 256),
    "cuda": ([(512, 8, 8, 4), (768, 12, 12, 4), (1024, 16, 16, 4), (1536, 16, 12, 4)], 16, 1024),
}
FIGURES = Path(__file__).parent


def overrides(size_key: str, shape: tuple, micro_batch_size: int, seq_len: int) -> dict:
    dim, layers, heads, kv_heads = shape
    return {
        "model.vocab_size": VOCAB[size_key],
        "model.dim": dim,
        "model.n_layers": layers,
        "model.n_heads": heads,
        "model.n_kv_heads": kv_heads,
        "model.max_seq_len": seq_len,
        "train.seq_len": seq_len,
        "train.micro_batch_size": micro_batch_size,
    }


def measure(ours: Trainee, theirs: Trainee, batch: dict, rounds: int) -> dict:
    """One point: a warm-up step each, peak memory of both (a profiled step), then ``rounds`` interleaved steps."""
    setting, tokens = ours.setting, batch["tokens"].numel()
    ours.step(batch)  # optimizer state allocated, kernels chosen: the profiled step is a steady one
    theirs.step(batch)
    peak, hf_peak = peak_bytes(ours, batch), peak_bytes(theirs, batch)
    times = [
        (timed(lambda: ours.step(batch), setting), timed(lambda: theirs.step(batch), setting)) for _ in range(rounds)
    ]
    return {
        "tokens_per_s": tokens / statistics.median(t for t, _ in times),
        "hf_tokens_per_s": tokens / statistics.median(h for _, h in times),
        "vs_hf_eager": statistics.median(h / t for t, h in times),
        "peak_mb": peak / 2**20,
        "hf_peak_mb": hf_peak / 2**20,
        "vs_hf_peak": peak / hf_peak,
        "kb_per_token": (peak - ours.live_bytes()) / tokens / 2**10,  # what the step adds to what it keeps
        "seconds_per_token": statistics.median(t for t, _ in times) / tokens,
    }


def sweep_sequence(setting, directory, record, note) -> list:
    shape, tokens, lengths = SEQUENCE[setting.size_key]
    recipe, model, hf, _ = pair("sota-2024", overrides(setting.size_key, shape, 1, max(lengths)), setting, directory)
    ours, theirs = Trainee.build(model, model.losses, recipe, setting), Trainee.build(hf, hf_loss(hf), recipe, setting)
    points = []
    for T in lengths:
        batch = micro_batch(recipe.model.vocab_size, tokens // T, T, setting.device)
        point = measure(ours, theirs, batch, min(setting.rounds, 3))
        attention = 3 * shape[1] * attention_flops(shape[2], shape[0] // shape[2], T)
        point["attention_flops_share"] = attention / model.flops_per_token(T)
        record(case=f"sequence T={T}", **point)
        points.append((T, point))
    a, b = fit_line([T for T, _ in points], [p["seconds_per_token"] for _, p in points])
    longest = lengths[-1]
    note(
        f"sequence: time/token = {a * 1e6:.1f} us + {b * 1e9:.2f} ns x T: the part growing with T is "
        f"{b * longest / (a + b * longest):.0%} of a step at T = {longest} and would be half at T = {a / b:,.0f}"
        if b > 0
        else "sequence: time per token does not grow with T here"
    )
    shares = ", ".join(f"{p['attention_flops_share']:.0%} at {T}" for T, p in points)
    note(f"sequence: attention's share of the step's FLOPs {shares}")
    kb = [p["kb_per_token"] for _, p in points]
    note(f"sequence: a step adds {kb[0]:.0f} KB/token at T = {lengths[0]}, {kb[-1]:.0f} at {longest}")
    return points


def sweep_size(setting, directory, record, note) -> list:
    shapes, micro_batch_size, seq_len = SIZE[setting.size_key]
    points = []
    for shape in shapes:
        options = overrides(setting.size_key, shape, micro_batch_size, seq_len)
        recipe, model, hf, batch = pair("sota-2024", options, setting, directory / f"d{shape[0]}")
        ours = Trainee.build(model, model.losses, recipe, setting)
        point = measure(ours, Trainee.build(hf, hf_loss(hf), recipe, setting), batch, min(setting.rounds, 3))
        point["parameters_m"] = model.num_parameters() / 1e6
        record(case=f"size d{shape[0]} x {shape[1]}", **point)
        points.append((point["parameters_m"], point))
    _, alpha = fit_line([math.log(n) for n, _ in points], [math.log(p["seconds_per_token"]) for _, p in points])
    per_parameter = [p["peak_mb"] * 2**20 / (n * 1e6) for n, p in points]
    note(
        f"size: time/token ~ parameters^{alpha:.2f}; peak {max(per_parameter):.0f} -> {min(per_parameter):.0f} "
        "bytes per parameter (fp32 weights, gradients and AdamW alone: 16)"
    )
    return points


def fit_line(x: list, y: list) -> tuple[float, float]:
    """Least squares y = a + b·x: (a, b)."""
    b, a = np.polyfit(np.asarray(x, dtype=float), np.asarray(y, dtype=float), 1)
    return float(a), float(b)


def plot(axis: str, points: list, path: Path) -> None:
    """tok/s and peak MB of both sides against the axis."""
    xs = [x for x, _ in points]
    figure = Figure(figsize=(10, 4), layout="tight")  # no pyplot: no display backend, nothing global
    speed, memory = figure.subplots(1, 2)
    for key, label in (("tokens_per_s", "minsota"), ("hf_tokens_per_s", "HF Llama")):
        speed.plot(xs, [p[key] for _, p in points], marker="o", label=label)
    for key, label in (("peak_mb", "minsota"), ("hf_peak_mb", "HF Llama")):
        memory.plot(xs, [p[key] for _, p in points], marker="o", label=label)
    xlabel = "sequence length (fixed tokens per step)" if axis == "sequence" else "parameters (M)"
    for ax, ylabel in ((speed, "tokens/s"), (memory, "peak MB")):
        ax.set_xscale("log", base=2 if axis == "sequence" else 10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend()
    figure.suptitle(f"train step, eager: {axis}")
    figure.savefig(path, dpi=100)


@pytest.mark.parametrize("axis", ["sequence", "size"])
def test_scaling(benchmark, record, note, setting, tmp_path, axis):
    sweep = sweep_sequence if axis == "sequence" else sweep_size
    points = []
    benchmark.pedantic(lambda: points.extend(sweep(setting, tmp_path, record, note)), rounds=1, iterations=1)
    path = (tmp_path if setting.smoke else FIGURES) / f"scaling-{axis}.png"
    plot(axis, points, path)
    assert path.stat().st_size > 0
    for _, point in points:  # the same loss, both sides: neither may be free
        assert point["tokens_per_s"] > 0 and point["peak_mb"] > 0
