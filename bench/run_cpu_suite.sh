#!/usr/bin/env bash
# Every CPU benchmark of docs/PERFORMANCE.md, one after another (run it alone on the machine).
# Results: bench/results/*.json and *.txt. Usage: bash bench/run_cpu_suite.sh [serve-seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/results
mkdir -p "$out"
serve_seconds=${1:-120}
model=$(python3 -c "from starchat.bench.checkpoints import random_checkpoint; print(random_checkpoint('tiny_starcoder'))")

python3 bench/load_memory.py --json "$out/load_memory.json" | tee "$out/load_memory.txt"
python3 bench/throughput.py --dtype float32 bfloat16 --concurrent 32 --json "$out/throughput.json" 2>&1 \
  | grep -v "Loading weights" | tee "$out/throughput.txt"

# Serving: 64 streams against the offline engine at the same batch, same model and dtype.
starchat bench throughput --model "$model" --num-prompts 64 --prompt-len 128 --new-tokens 128 \
  --json "$out/offline64.json" | tee "$out/offline64.txt"
port=8765
starchat serve --model "$model" --port $port --max-concurrent-requests 64 --log-level warning &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do sleep 1; done
starchat bench serve --base-url "http://127.0.0.1:$port" --concurrency 64 --duration "$serve_seconds" \
  --input-len 128 --output-len 128 --warmup 4 --json "$out/serve64.json" | tee "$out/serve64.txt"
kill -TERM $server; wait $server || true

python3 bench/batch.py --model "$model" --rows 1000 --max-new-tokens 16 --batch-size 64 2>&1 | tee "$out/batch.txt"
