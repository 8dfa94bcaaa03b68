#!/usr/bin/env bash
# docs/results.md section 2: issue 3's sharding table on one 4-GPU node, in two device calls of ~570 s.
# Benches run side by side on disjoint GPU pairs (0,1 and 2,3; energy is read per GPU, so the pairs do
# not mix); 4-shard configurations get all four GPUs. NVML read-only throughout.
# Usage (GPU node, llmwatts installed, from anywhere): bench/sharding_4gpu.sh OUT_DIR SECONDS PART
#   PART 1: llmwatts 7b x1, x2, 13b x1 (pair 0,1) | the transformers baseline 7b x1, x2, then 13b x2
#           (pair 2,3); then 65b, 7b, 13b x4.
#   PART 2: the baseline 7b x1, x2 (pair 0,1) | llmwatts 7b x1, x2, then 13b x2 (pair 2,3), so the
#           baseline and ours share a call; then 13b x4.
set -uo pipefail
out=$(realpath "${1:?output dir}"); budget_s=${2:-560}; part=${3:-1}
bench=$(realpath "$(dirname "$0")/sharding.py")
mkdir -p "$out"; cd "$(mktemp -d)"  # not the repo root: its llmwatts/ folder would shadow the package
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
t0=$(date +%s)
until_s() { echo $(( t0 + $1 - $(date +%s) )); }  # seconds from now until t0 + $1
run() { python3 "$bench" --json "$out/$1.json" "${@:2}" > "$out/$1.log" 2>&1; }
nvidia-smi --query-gpu=index,name,driver_version,power.limit,power.default_limit --format=csv > "$out/gpus.csv" 2>&1
p1=$(( budget_s * 52 / 100 ))
fast=(--engines fast --batches 1,64,max)
baseline=(--models llama-7b --shards 1,2 --no-llmwatts --baseline llama-7b --batches 1,64)

if [ "$part" = 1 ]; then
  ( export CUDA_VISIBLE_DEVICES=0,1
    run a1 --models llama-7b --shards 1,2 "${fast[@]}" --deadline-s "$(until_s $p1)"
    run a2 --models llama-13b --shards 1 "${fast[@]}" --deadline-s "$(until_s $p1)" ) &
  ( export CUDA_VISIBLE_DEVICES=2,3
    run b1 "${baseline[@]}" --deadline-s "$(until_s $p1)"
    run b2 --models llama-13b --shards 2 "${fast[@]}" --deadline-s "$(until_s $p1)" ) &
  wait
  run c --models llama-65b,llama-7b,llama-13b --shards 4 --engines fast --batches 64,max \
    --deadline-s "$(until_s $(( budget_s - 25 )))"
  logs="a1 a2 b1 b2 c"
else
  ( export CUDA_VISIBLE_DEVICES=0,1
    run d1 "${baseline[@]}" --deadline-s "$(until_s $(( budget_s * 60 / 100 )))" ) &
  ( export CUDA_VISIBLE_DEVICES=2,3
    run e1 --models llama-7b --shards 1,2 "${fast[@]}" --deadline-s "$(until_s $(( budget_s * 60 / 100 )))"
    run e2 --models llama-13b --shards 2 --engines fast --batches 64,max --deadline-s "$(until_s $(( budget_s * 60 / 100 )))" ) &
  wait
  run f --models llama-13b --shards 4 --engines fast --batches 64,max --deadline-s "$(until_s $(( budget_s - 20 )))"
  logs="d1 e1 e2 f"
fi
for f in $logs; do grep -h '^|' "$out/$f.log" | grep -v -- '---\|^| system'; done
