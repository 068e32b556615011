#!/usr/bin/env bash
# One lent-GPU call for the engine (no training): the CUDA tests, the Triton decode-attention,
# add+LayerNorm and up-projection+GELU kernels against PyTorch's (measured in session 22; only
# with KERNELS_TIMEOUT=60 or more), the int8 products with every block choice tuning tries at one
# row (bench/gpu_int8.py --sweep; also at 16 and 128 rows against dequantize + cuBLAS), then the
# GPU table. Each stage has its own time limit so that one hang cannot lose the others' results;
# everything lands in $OUT (logs and JSON). On an H200 (session 22) the stages took about 3.5
# minutes in all; session 23's 64- and 128-row tuning adds some 60 kernels to compile on first use.
#
#   bash tools/gpu_check.sh          (repo root, on the device machine; at most 9.5 minutes of stages, under the device call limit of 10)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv > "$OUT/gpu.txt" 2>&1
timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -v -rfE tests/test_cuda.py > "$OUT/test_cuda.txt" 2>&1
echo "test_cuda exit $?" >> "$OUT/test_cuda.txt"
if [ "${KERNELS_TIMEOUT:-0}" != 0 ]; then
  timeout "${KERNELS_TIMEOUT}" python3 bench/gpu_kernels.py --json "$OUT/gpu_kernels.json" > "$OUT/gpu_kernels.txt" 2>&1
  echo "gpu_kernels exit $?" >> "$OUT/gpu_kernels.txt"
fi
# the int8 sweep also fills Triton's cache with the suite's int8 tuning candidates
# (INT8_EXPLORE=1 also times 24 more row-kernel blocks: give it INT8_TIMEOUT=220 and a shorter suite)
timeout "${INT8_TIMEOUT:-80}" python3 bench/gpu_int8.py --sweep ${INT8_EXPLORE:+--explore} --rows 1 16 128 --json "$OUT/gpu_int8.json" > "$OUT/gpu_int8.txt" 2>&1
echo "gpu_int8 exit $?" >> "$OUT/gpu_int8.txt"
timeout "${SUITE_TIMEOUT:-250}" python3 bench/gpu_suite.py --latency-tokens 64 --json "$OUT/gpu_suite.json" > "$OUT/gpu_suite.txt" 2>&1
echo "gpu_suite exit $?" >> "$OUT/gpu_suite.txt"
tail -n 3 "$OUT"/test_cuda.txt; cat "$OUT"/gpu_int8.txt; cat "$OUT/gpu_kernels.txt" 2>/dev/null; grep -E "sequences|^---|ms_per_token|prefill_tokens|error" "$OUT/gpu_suite.txt"
