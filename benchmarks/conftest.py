"""Benchmark fixtures and options: the device setting, --smoke, the C allocator's setting, a fresh compiler per
case, the summary table.

pytest benchmarks                              # full sizes; prints one summary table at the end
pytest benchmarks --benchmark-save=NAME        # ... and stores the JSON (extra_info holds every figure)
pytest benchmarks --benchmark-compare          # ... against the newest stored run
pytest benchmarks --smoke --benchmark-disable  # CI: tiny sizes, each case once, parity still asserted
pytest benchmarks --rounds 5                   # fewer (or more) timed rounds per case
MINSOTA_MALLOC=default pytest benchmarks       # ... with glibc's default allocator (below)

The process keeps large allocations in glibc's heap, as the trainer does (`minsota.runtime.
keep_allocations_in_heap`), unless ``MINSOTA_MALLOC=default`` (or glibc's malloc tunables) say otherwise: one
setting for every case and peer of a run, so a comparison of both allocators takes two runs.
"""

import os

import pytest
import torch

from minsota.runtime import keep_allocations_in_heap

from harness import Setting

MALLOC = pytest.StashKey[str]()

COLUMNS = {  # summary-table column -> heading, in print order
    "ms": "ms",
    "speedup": "speed-up",
    "vs": "over",
    "max_abs_diff": "max|diff|",
    "mean_abs_diff": "mean|diff|",
    "tokens_per_s": "tok/s",
    "hf_tokens_per_s": "HF tok/s",
    "global_tokens_per_s": "global tok/s",
    "tokenizer": "tokenizer",
    "mfu": "MFU",
    "matmul_gflops": "matmul GF/s",
    "mfu_own_gemms": "MFU own GEMMs",
    "own_gemm_gflops": "own GEMMs GF/s",
    "gemm_share": "GEMM share",
    "gemm_gflops_in_step": "GEMM GF/s in step",
    "other_ms": "non-GEMM ms",
    "hf_gemm_share": "HF GEMM share",
    "hf_gemm_gflops_in_step": "HF GEMM GF/s",
    "hf_other_ms": "HF non-GEMM ms",
    "vs_hf_eager": "x HF eager",
    "vs_hf_compile": "x HF compiled",
    "td_overhead": "TD overhead",
    "peak_mb": "peak MB",
    "vs_hf_peak": "x HF peak",
    "rows": "chunk rows",
    "vs_chunk_256": "x 256 rows",
    "vs_unfused": "x unfused",
    "vs_256_peak": "x 256 peak",
    "vs_unfused_peak": "x unfused peak",
    "hf_peak_mb": "HF peak MB",
    "kb_per_token": "KB/token",
    "attention_flops_share": "attention FLOPs",
    "parameters_m": "params M",
    "backend": "backend",
    "vs_dense": "x dense",
    "mla_bytes": "MLA B/token",
    "other_bytes": "GQA|full B/token",
    "cache_ratio": "cache ratio",
    "malloc": "malloc",
}
ROWS = pytest.StashKey[list]()
NOTES = pytest.StashKey[list]()


def pytest_addoption(parser):
    parser.addoption(
        "--smoke",
        action="store_true",
        help="tiny sizes and a single round: checks that every benchmark runs and its parity holds",
    )
    parser.addoption("--rounds", type=int, help="timed rounds per case (default 10 on a CPU, 20 on CUDA)")


def pytest_configure(config):
    config.stash[ROWS] = []
    config.stash[NOTES] = []
    heap = keep_allocations_in_heap()  # before any case allocates
    config.stash[MALLOC] = (
        "heap" if heap else "GLIBC_TUNABLES" if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") else "default"
    )


def pytest_report_header(config):
    return f"C allocator: {config.stash[MALLOC]} (MINSOTA_MALLOC=default for glibc's own)"


@pytest.fixture(scope="session")
def setting(request) -> Setting:
    smoke, rounds = request.config.getoption("--smoke"), request.config.getoption("--rounds")
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32 for what runs outside autocast, as minsota.train sets
        return Setting(torch.device("cuda"), torch.bfloat16, smoke, rounds=1 if smoke else rounds or 20)
    return Setting(torch.device("cpu"), torch.float32, smoke, rounds=1 if smoke else rounds or 10)


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each case compiles from scratch: no graphs, guards or recompile counts carried over from the last."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


@pytest.fixture
def record(request, benchmark):
    """record(**figures): store figures in the benchmark's extra_info (saved JSON) and the summary table;
    record(case=NAME, **figures) for one of several rows of a case (extra_info then keys them by NAME)."""

    def store(case: str | None = None, **figures):
        figures = {**figures, "malloc": request.config.stash[MALLOC]}
        benchmark.extra_info.update({case: figures} if case else figures)
        suite = request.node.module.__name__.removeprefix("bench_")
        name = case or request.node.name.split("[", 1)[-1].rstrip("]")
        request.config.stash[ROWS].append((suite, name, figures))

    return store


@pytest.fixture
def note(request):
    """note(line): a line printed below the summary table (a fitted law, a finding)."""
    return request.config.stash[NOTES].append


def _cell(key: str, value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return f"{value:,}"
    if key.startswith("mfu") or key.endswith("_share") or key == "td_overhead":
        return f"{value:.1%}"
    if key.endswith("abs_diff"):
        return f"{value:.1e}"
    if key == "speedup" or key.startswith("vs_"):
        return f"{value:.2f}x"
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def pytest_terminal_summary(terminalreporter, config):
    rows = config.stash.get(ROWS, [])
    if not rows:
        return
    columns = [key for key in COLUMNS if any(key in figures for _, _, figures in rows)]
    table = [["suite", "case", *(COLUMNS[key] for key in columns)]]
    table += [
        [suite, case, *(_cell(key, figures[key]) if key in figures else "" for key in columns)]
        for suite, case, figures in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    terminalreporter.section("minsota benchmarks")
    for row in table:
        terminalreporter.write_line("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    for line in config.stash[NOTES]:
        terminalreporter.write_line(line)
