"""The GPU benchmark scripts run end to end on the CPU (their --quick pipeline checks), so that a
lent GPU's few minutes are never lost to a script that breaks before it measures anything.

The figures are meaningless here (CPU, tiny sizes, Triton's interpreter); what is checked is that
every stage ran and wrote the fields docs/PERFORMANCE.md is filled from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_bench(arguments: list[str], tmp_path: Path, **environment: str) -> dict:
    out = tmp_path / "figures.json"
    result = subprocess.run([sys.executable, *arguments, "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env={**os.environ, **environment})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


def test_gpu_suite_runs_every_stage(tmp_path):
    # without the interpreter: the CPU's own kernels (the interpreter would take minutes at this shape)
    figures = run_bench(["bench/gpu_suite.py", "--device", "cpu", "--quick", "--skip-hf", "--shape", "tiny_starcoder"],
                        tmp_path, TRITON_INTERPRET="0")
    stages = ("ours_cuda_graphs", "decode_profile", "verify_steps", "ours_dependent_launch", "ours_int8",
              "ours_graphs_pytorch_kernels")
    for stage in stages:
        assert stage in figures and "error" not in figures[stage], (stage, figures.get(stage))
    for stage in ("ours_cuda_graphs", "ours_graphs_pytorch_kernels"):
        concurrent = figures[stage]["concurrent"]
        assert set(concurrent) == {"2", "4"}  # --quick's concurrency
        assert all(run["output_tokens_per_s"] > 0 and run["host_ms_per_step"]["decode_steps"] > 0
                   for run in concurrent.values())
        assert figures[stage]["prefill_tokens_per_s"] > 0 and figures[stage]["latency"]
    int8 = figures["ours_int8"]
    assert int8["latency"] and int8["concurrent"]["4"]["output_tokens_per_s"] > 0
    assert "skipped" in figures["ours_dependent_launch"] and "skipped" in int8["dependent_launch"]  # sm_90+ only
    assert set(figures["decode_profile"]) == {"1", "4"}
    assert figures["weight_bytes_per_token"]["int8"] < figures["weight_bytes_per_token"]["bf16"]


def test_gpu_int8_products_and_sweep_run(tmp_path):
    pytest.importorskip("triton")
    figures = run_bench(["bench/gpu_int8.py", "--device", "cpu", "--quick", "--sweep"], tmp_path, TRITON_INTERPRET="1")
    layers = {row["layer"] for row in figures["products"]}
    assert layers and {row["rows"] for row in figures["products"]} == {1, 8}
    assert all(row["int8_triton_us"] > 0 and row["int8_dequantize_us"] > 0 for row in figures["products"])
    assert {entry["layer"] for entry in figures["sweep"]} == layers
    assert all(entry["best_tiled"] and entry["best_row_kernel"] for entry in figures["sweep"])
