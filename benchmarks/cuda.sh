#!/usr/bin/env bash
# The benchmarks on a CUDA GPU in one go (written for a lent H200 and a 15-minute budget; not yet run).
#
# Needs a Python environment with a CUDA build of torch and minsota's dev extras (transformers,
# pytest-benchmark) installed: `pip install -e ".[dev]"` with a CUDA torch. Nothing is downloaded.
# Sizes switch to CUDA by themselves: bf16 autocast, attention T 1024-8192, the train step of sota-2024
# itself (~124M parameters, batch 16 x 1024) against HF Llama with the same weights.
#
# Targets (issue 6): flash >= 4x math at T=4096 (test_kernel[4096-flash-*]); >= 50% bf16 MFU for the train
# step (MFU against the bf16 matmul rate minsota.runtime.peak_flops measures). The targets' suites run first,
# so a short budget still records them; results land in $OUT (or benchmarks/cuda-results/) as JSON + log.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/cuda-results}"
mkdir -p "$out"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$out/inductor-cache}"  # the second stage reuses graphs
python - <<'EOF' | tee "$out/machine.txt"
import torch, transformers
assert torch.cuda.is_available(), "no CUDA device: this script measures the GPU figures only"
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"transformers {transformers.__version__}")
EOF
run() {  # run NAME PYTEST_ARGS...: one stage, its JSON and its log (with the summary table) in $out
  local name=$1; shift
  python -m pytest benchmarks -p no:cacheprovider --benchmark-json="$out/$name.json" "$@" 2>&1 | tee "$out/$name.log"
}
status=0  # a failing stage (parity) does not keep the other from being measured
run targets -k "test_kernel or test_train_step" || status=$?
run rest -k "not test_kernel and not test_train_step" || status=$?
exit $status
