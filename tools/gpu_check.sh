#!/usr/bin/env bash
# One lent-GPU call for the engine (no training): the CUDA tests, the Triton decode-attention,
# add+LayerNorm and up-projection+GELU kernels against PyTorch's, the int8 kernel's products (its block sizes are now
# tuned per shape at load: bench/gpu_int8.py --sweep is left out), then the GPU table. Each stage has its own time limit so that one hang cannot
# lose the others' results; everything lands in $OUT (logs and JSON).
#
#   bash tools/gpu_check.sh          (repo root, on the device machine; at most 9 minutes of stages, under the device call limit of 10)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv > "$OUT/gpu.txt" 2>&1
timeout "${TESTS_TIMEOUT:-145}" python3 -m pytest -v -rfE tests/test_cuda.py > "$OUT/test_cuda.txt" 2>&1
echo "test_cuda exit $?" >> "$OUT/test_cuda.txt"
timeout "${KERNELS_TIMEOUT:-80}" python3 bench/gpu_kernels.py --json "$OUT/gpu_kernels.json" > "$OUT/gpu_kernels.txt" 2>&1
echo "gpu_kernels exit $?" >> "$OUT/gpu_kernels.txt"
timeout "${INT8_TIMEOUT:-55}" python3 bench/gpu_int8.py --json "$OUT/gpu_int8.json" > "$OUT/gpu_int8.txt" 2>&1
echo "gpu_int8 exit $?" >> "$OUT/gpu_int8.txt"
timeout "${SUITE_TIMEOUT:-275}" python3 bench/gpu_suite.py --latency-tokens 64 --json "$OUT/gpu_suite.json" > "$OUT/gpu_suite.txt" 2>&1
echo "gpu_suite exit $?" >> "$OUT/gpu_suite.txt"
tail -n 3 "$OUT"/test_cuda.txt "$OUT"/gpu_int8.txt; cat "$OUT/gpu_kernels.txt"; tail -n 40 "$OUT/gpu_suite.txt"
