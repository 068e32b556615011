#!/usr/bin/env bash
# One lent-GPU call for the engine (no training): the CUDA tests, the int8 kernel's products and
# block sweep, then the GPU table. Each stage has its own time limit so that one hang cannot
# lose the others' results; everything lands in $OUT (logs and JSON).
#
#   bash tools/gpu_check.sh          (repo root, on the device machine; about 9 minutes at most)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv > "$OUT/gpu.txt" 2>&1
timeout "${TESTS_TIMEOUT:-120}" python3 -m pytest -q tests/test_cuda.py > "$OUT/test_cuda.txt" 2>&1
echo "test_cuda exit $?" >> "$OUT/test_cuda.txt"
timeout "${INT8_TIMEOUT:-180}" python3 bench/gpu_int8.py --sweep --json "$OUT/gpu_int8.json" > "$OUT/gpu_int8.txt" 2>&1
echo "gpu_int8 exit $?" >> "$OUT/gpu_int8.txt"
timeout "${SUITE_TIMEOUT:-260}" python3 bench/gpu_suite.py --latency-tokens 64 --json "$OUT/gpu_suite.json" > "$OUT/gpu_suite.txt" 2>&1
echo "gpu_suite exit $?" >> "$OUT/gpu_suite.txt"
tail -n 3 "$OUT"/test_cuda.txt "$OUT"/gpu_int8.txt; tail -n 40 "$OUT/gpu_suite.txt"
