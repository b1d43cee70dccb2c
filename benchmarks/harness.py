"""The benchmark harness: the device setting, interleaved timing and parity figures (fixtures live in conftest.py).

Timing: a case's subject is timed by pytest-benchmark; the peers it is compared with (the math kernel, the
reference block, Hugging Face's model, ...) run in pytest-benchmark's untimed ``setup`` and are timed here,
so every round runs each peer and then the subject. Ratios are medians of per-round ratios: eager speed
drifts ~30% between processes and other load drifts within one, and a round's peer and subject share it.
"""

import statistics
import time
from dataclasses import dataclass

import torch

# fp32: max |actual - expected| <= 1e-4 · max |expected| (the unit tests use 1e-5 on toy sizes; benchmark
# sizes sum over up to 2048 keys and 1024 features). bf16 autocast against an fp32 reference: 3e-2.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def size_key(smoke: bool) -> str:
    """Which sizes a suite runs: "smoke" (tiny, for CI), else "cuda" or "cpu" by the device present."""
    return "smoke" if smoke else "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Setting:
    device: torch.device
    dtype: torch.dtype  # fp32 on CPU (bf16 is emulated there, 2.4-3.9x slower); bf16 autocast on CUDA
    smoke: bool
    rounds: int

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def size_key(self) -> str:
        return size_key(self.smoke)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)


def timed(fn, setting: Setting) -> float:
    setting.sync()
    start = time.perf_counter()
    fn()
    setting.sync()
    return time.perf_counter() - start


def interleaved(benchmark, setting: Setting, subject, peers: dict, warmup: int = 1) -> dict[str, float]:
    """Time ``subject`` with pytest-benchmark and each peer (name -> callable) in the same rounds.

    Returns, per peer, the median over rounds of peer time / subject time (> 1: the subject is faster), and
    ``"ms"``, the subject's median; empty when timing is off (--benchmark-disable), where everything runs once.
    """
    samples = {name: [] for name in peers}

    def run_peers():
        for name, peer in peers.items():
            samples[name].append(timed(peer, setting))

    def run_subject():
        subject()
        setting.sync()

    benchmark.pedantic(run_subject, setup=run_peers, rounds=setting.rounds, warmup_rounds=warmup)
    if not benchmark.enabled:
        return {}
    own = benchmark.stats.stats.data
    ratios = {name: statistics.median(p / s for p, s in zip(times[warmup:], own)) for name, times in samples.items()}
    return {"ms": statistics.median(own) * 1e3, **ratios}


def speed(timing: dict, over: str | None = None, label: str | None = None) -> dict:
    """Summary figures from `interleaved`'s result: the subject's ms and its speed-up over the peer ``over``."""
    if not timing:
        return {}
    if over is None:
        return {"ms": timing["ms"]}
    return {"ms": timing["ms"], "speedup": timing[over], "vs": label or over}


def parity(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> dict[str, float]:
    """Max and mean |actual - expected|; fails (naming both) unless max <= tolerance · max |expected|."""
    diff = (actual.detach().double() - expected.detach().double()).abs()
    figures = {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item()}
    allowed = tolerance * expected.detach().double().abs().max().item()
    assert figures["max_abs_diff"] <= allowed, (
        f"{what}: max abs diff {figures['max_abs_diff']:.3e}, mean abs diff {figures['mean_abs_diff']:.3e}, "
        f"allowed {allowed:.3e} ({tolerance} relative)"
    )
    return figures


def worst(*figures: dict) -> dict[str, float]:
    """The largest max and mean abs diff of several parity checks (e.g. output and each gradient)."""
    return {key: max(f[key] for f in figures) for key in ("max_abs_diff", "mean_abs_diff")}
