#!/usr/bin/env bash
# The benchmarks on a CUDA GPU in one go (written for a lent H200 and a 15-minute budget; not yet run).
#
# Needs a Python environment with a CUDA build of torch and minsota's dev extras (transformers,
# pytest-benchmark) installed: `pip install -e ".[dev]"` with a CUDA torch. Nothing is downloaded.
# Sizes switch to CUDA by themselves: bf16 autocast, attention T 1024-8192, the train step of sota-2024
# itself (~153M parameters, batch 16 x 1024) against HF Llama with the same weights.
#
# Targets (issue 6): flash >= 4x math at T=4096 (test_kernel[4096-flash-*]); >= 50% bf16 MFU for the train
# step (MFU against the bf16 matmul rate minsota.runtime.peak_flops measures). The targets' suites run first,
# so a short budget still records them; results land in $OUT (or benchmarks/cuda-results/) as JSON + log.
#
# A pre-flight first names every missing piece at once (a CUDA device, the packages, minsota installed so
# that its entry points exist); a smoke stage (tiny sizes, each case once) then shows that everything runs;
# every stage has a time limit (STAGE_SECONDS, default 420 s); the inductor cache lives apart from the
# results (TORCHINDUCTOR_CACHE_DIR, default ~/.cache/minsota-inductor), so $OUT holds figures only.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/cuda-results}"
limit="${STAGE_SECONDS:-420}"
mkdir -p "$out"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$HOME/.cache/minsota-inductor}"  # stages reuse graphs
python - <<'PREFLIGHT' | tee "$out/machine.txt"
import importlib.metadata, importlib.util, sys
missing = [name for name in ("torch", "transformers", "pytest_benchmark", "tensordict", "rotary_embedding_torch",
                             "pluggy", "safetensors", "datasets") if importlib.util.find_spec(name) is None]
if not any(e.name == "norms" for e in importlib.metadata.entry_points(group="minsota")):
    missing.append('minsota itself (pip install -e ".[dev]": its built-in plugins are entry points)')
if missing:
    sys.exit("missing: " + ", ".join(missing))
import torch, transformers
if not torch.cuda.is_available():
    sys.exit(f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}): "
             "this script measures the GPU figures only")
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"transformers {transformers.__version__}")
PREFLIGHT
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 2
run() {  # run NAME PYTEST_ARGS...: one stage under the time limit; its JSON and its log (summary table) in $out
  local name=$1; shift
  timeout --signal=INT "$limit" python -m pytest benchmarks -p no:cacheprovider --benchmark-json="$out/$name.json" \
    "$@" 2>&1 | tee "$out/$name.log"
  local code=${PIPESTATUS[0]}
  if [ "$code" -eq 124 ]; then echo "minsota: stage $name stopped at its ${limit} s limit" | tee -a "$out/$name.log"; fi
  return "$code"
}
run smoke --smoke --benchmark-disable || exit $?  # a case that cannot run makes the timings moot
status=0  # a failing stage (parity) does not keep the others from being measured
run targets -k "test_kernel or test_train_step" || status=$?
run data -k "test_loader" || status=$?
run rest -k "not test_kernel and not test_train_step and not test_loader" || status=$?
exit $status
