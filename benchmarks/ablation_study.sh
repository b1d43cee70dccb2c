#!/usr/bin/env bash
# The README's ablation study ("Does the baseline hold?"): ablation-base against GPT-2's architecture and each
# single change, 3 seeds each (57 runs); then the baseline and three variants with the data order varied by the seed
# as well (12 runs of their own); then the report.
# Usage: bash benchmarks/ablation_study.sh [OUT]    (default runs/ablation-study; rerun the same to resume)
# One thread per run: on a shared 2-core machine a second OpenMP thread waits on the first more than it helps.
set -euo pipefail
out=${1:-runs/ablation-study}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
variants=(
    ablation-gpt2
    ablation-layernorm ablation-learned-positions ablation-gelu-mlp ablation-mha ablation-parallel ablation-postnorm
    ablation-bias ablation-geglu ablation-geglu-tanh ablation-warmup-cosine ablation-wsd
    ablation-qk-norm ablation-z-loss ablation-local-global ablation-muon ablation-moe ablation-mla
)
minsota compare ablation-base "${variants[@]}" --seeds 3 --out "$out/init"
# the data order varied by the seed too: the baseline's spread, and whether three of the differences survive it
minsota compare ablation-base ablation-gpt2 ablation-postnorm ablation-muon --seeds 3 --vary-data-order \
    --out "$out/data-order"
python benchmarks/ablation_report.py "$out"   # docs/ablation/: compare.json, ablation.png; the README's tables
