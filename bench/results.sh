#!/usr/bin/env bash
# docs/results.md, single GPU: serve random llama-7b on one GPU with real NVML telemetry (read-only),
# replay Alpaca at batch 1 and 32 with Locust through the gRPC server (fast and eager engines), report;
# and show the real power-cap limits through the Control RPC, with `cap set` refused (nvml-readonly).
# Usage (GPU machine, llmwatts installed): bench/results.sh DATA_DIR OUT_DIR
set -uo pipefail
data=${1:?data dir with alpaca_5k.jsonl}; out=${2:?output dir}
work=$(mktemp -d); mkdir -p "$out"
data=$(realpath "$data"); out=$(realpath "$out")
cd "$work"  # not the repo root: its llmwatts/ folder would shadow the installed package's mapped boxes
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
llm() { python3 -m llmwatts.cli "$@"; }
nvidia-smi --query-gpu=name,driver_version,power.limit,power.default_limit,power.min_limit,power.max_limit \
  --format=csv > "$out/gpu.csv" 2>&1

# Power caps, read-only: the real default, limit and constraints; a set must be refused cleanly.
llm serve --model tiny --device cuda --engine eager --power-backend nvml-readonly --allow-insecure-loopback-control \
  --port 0 --port-file "$work/caps.port" --db "$work/caps.db" > "$work/caps-server.log" 2>&1 &
pid=$!
for _ in $(seq 120); do [ -f "$work/caps.port" ] && break; sleep 1; done
target=127.0.0.1:$(cat "$work/caps.port")
{ echo '$ llmwatts cap get'; llm cap get --target "$target"; echo "rc=$?"
  echo '$ llmwatts cap set --watts 500'; llm cap set --target "$target" --watts 500 --reason "read-only check"; echo "rc=$?"
} > "$out/caps.txt" 2>&1
kill -TERM $pid; wait $pid

# The study: each engine at batch 1 and 32, 256 fixed new tokens.
for engine in fast eager; do
  n=8; [ $engine = eager ] && n=2
  timeout 280 python3 -m llmwatts.cli demo --model llama-7b --device cuda --engine $engine \
    --power-backend nvml-readonly --batch-sizes 1,32 --datasets alpaca --data-dir "$data" --requests $n --users 1 \
    --max-new-tokens 256 --out "$work/$engine" > "$work/$engine.log" 2>&1
  echo "engine $engine rc=$?" >> "$out/runs.md"
  cat "$work/$engine/runs.md" >> "$out/runs.md" 2>/dev/null || tail -30 "$work/$engine.log" >> "$out/runs.md"
  cp "$work/$engine/runs.csv" "$out/runs-$engine.csv" 2>/dev/null
  grep -v Warning "$work/$engine.log" | tail -20
done
cat "$out/gpu.csv" "$out/caps.txt" "$out/runs.md"
