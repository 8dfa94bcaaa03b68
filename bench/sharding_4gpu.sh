#!/usr/bin/env bash
# docs/results.md section 2: issue 3's sharding table on one 4-GPU node inside a single ~570 s device call.
# Phase 1 runs two benches side by side on disjoint GPU pairs (0,1 and 2,3; energy is read per GPU, so the
# pairs do not mix); phase 2 the 4-shard configurations on all four GPUs. NVML read-only throughout.
# Usage (GPU node, llmwatts installed, from anywhere): bench/sharding_4gpu.sh OUT_DIR [SECONDS]
set -uo pipefail
out=$(realpath "${1:?output dir}"); budget_s=${2:-560}
bench=$(realpath "$(dirname "$0")/sharding.py")
mkdir -p "$out"; cd "$(mktemp -d)"  # not the repo root: its llmwatts/ folder would shadow the package
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
t0=$(date +%s)
until_s() { echo $(( t0 + $1 - $(date +%s) )); }  # seconds from now until t0 + $1
run() { python3 "$bench" --json "$out/$1.json" "${@:2}" > "$out/$1.log" 2>&1; }
nvidia-smi --query-gpu=index,name,driver_version,power.limit,power.default_limit --format=csv > "$out/gpus.csv" 2>&1
p1=$(( budget_s * 52 / 100 ))

# Phase 1, GPUs 0,1: llmwatts (fast engine) on llama-7b at 1 and 2 shards, then llama-13b on 1.
( export CUDA_VISIBLE_DEVICES=0,1
  run a1 --models llama-7b --shards 1,2 --engines fast --batches 1,64,max --deadline-s "$(until_s $p1)"
  run a2 --models llama-13b --shards 1 --engines fast --batches 1,64,max --deadline-s "$(until_s $p1)" ) &
# Phase 1, GPUs 2,3: transformers' tp_plan baseline on llama-7b at 1 and 2 shards, then llmwatts llama-13b on 2.
( export CUDA_VISIBLE_DEVICES=2,3
  run b1 --models llama-7b --shards 1,2 --no-llmwatts --baseline llama-7b --batches 1,64 \
    --deadline-s "$(until_s $p1)"
  run b2 --models llama-13b --shards 2 --engines fast --batches 1,64,max --deadline-s "$(until_s $p1)" ) &
wait
# Phase 2: 4 shards on all four GPUs, the 65B first.
run c --models llama-65b,llama-7b,llama-13b --shards 4 --engines fast --batches 64,max \
  --deadline-s "$(until_s $(( budget_s - 25 )))"
for f in a1 a2 b1 b2 c; do grep -h '^|' "$out/$f.log" | grep -v -- '---\|^| system'; done
