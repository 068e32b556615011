"""int8 weight products on a GPU: starchat's Triton kernel against dequantize + cuBLAS and against
the bf16 product it replaces, on a shape's real layer sizes, with a sweep of the kernel's blocks.

    python3 bench/gpu_int8.py [--shape starchat-beta] [--rows 1 8 32 64] [--sweep] [--json OUT.json]
    TRITON_INTERPRET=1 python bench/gpu_int8.py --device cpu --quick      # pipeline check, no GPU

For each weight shape (N, K) of one block plus the lm_head, and each row count: microseconds per
product (replayed in a CUDA graph, as decode steps run them: tuned_linear.per_call_us), and the weight bandwidth
it achieves (weight bytes / time): int8 kernel (1 byte per weight), dequantize + cuBLAS (what
CUDA int8 ran before), bf16 cuBLAS (2 bytes per weight). The device-to-device copy bandwidth of
the same run gives the floor. With --sweep, every block choice that tuning tries for int8 at 1 row
(the tiled kernel's tuned_linear.INT8_CANDIDATES, the row kernel's ROW_CANDIDATES) is timed per
shape, and the best of each kernel is printed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from starchat.bench.machine import describe_machine, measure_read_bandwidth  # noqa: E402
from starchat.config import NAMED_SHAPES, linear_weight_shapes  # noqa: E402
from starchat.model import triton_linear, tuned_linear  # noqa: E402
from starchat.model.tuned_linear import per_call_us  # noqa: E402
from starchat.model.quant import quantize_per_channel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="starchat-beta", choices=sorted(NAMED_SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--explore", action="store_true",
                        help="with --sweep: also 24 row-kernel blocks beyond the tuner's (about 2 minutes more on a GPU)")
    parser.add_argument("--quick", action="store_true", help="small layers, few block choices: checks the pipeline")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    probe = torch.zeros(1, 16, dtype=torch.bfloat16 if device.type == "cuda" else torch.float16, device=device)
    if not triton_linear.supports(probe):
        sys.exit("gpu_int8: the Triton int8 kernel does not run here (needs Triton and an Ampere or newer GPU, "
                 "or TRITON_INTERPRET=1 on a CPU)")
    dtype = probe.dtype  # the interpreter has no bfloat16: float16 stands in on a CPU
    shapes = linear_weight_shapes(NAMED_SHAPES[args.shape])
    if args.quick:
        shapes = {name: (max(16, n // 64), max(16, k // 64)) for name, (n, k) in list(shapes.items())[:2]}
        args.rows = [1, 8]
    bandwidth = measure_read_bandwidth(device, size_mib=1024 if device.type == "cuda" else 64)
    results = {"machine": describe_machine(device), "shape": args.shape, "dtype": str(dtype),
               "copy_bandwidth_gb_per_s": bandwidth / 1e9, "products": [], "sweep": []}
    print(f"machine: {results['machine']}\ncopy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)", flush=True)
    generator = torch.Generator(device=device).manual_seed(0)
    for name, (out_features, in_features) in shapes.items():
        weight, scales = quantize_per_channel(torch.randn(out_features, in_features, device=device, generator=generator))
        scales = scales.to(dtype)
        dense = (weight.to(dtype) * scales[:, None]).contiguous()
        for rows in args.rows:
            x = torch.randn(rows, in_features, device=device, generator=generator).to(dtype)
            figures = {"layer": name, "n": out_features, "k": in_features, "rows": rows,
                       "int8_triton_us": per_call_us(lambda: triton_linear.linear(x, weight, scales), device),
                       "int8_dequantize_us": per_call_us(lambda: torch.nn.functional.linear(
                           x, weight.to(dtype) * scales[:, None]), device),
                       "bf16_cublas_us": per_call_us(lambda: torch.nn.functional.linear(x, dense), device)}
            figures["int8_triton_gb_per_s"] = weight.numel() / figures["int8_triton_us"] / 1e3
            figures["bf16_cublas_gb_per_s"] = 2 * weight.numel() / figures["bf16_cublas_us"] / 1e3
            results["products"].append(figures)
            print(f"{name:12s} {out_features:6d}x{in_features:<6d} rows {rows:3d}: int8 triton {figures['int8_triton_us']:8.1f} us "
                  f"({figures['int8_triton_gb_per_s']:6.0f} GB/s)  dequantize+cuBLAS {figures['int8_dequantize_us']:8.1f} us  "
                  f"bf16 cuBLAS {figures['bf16_cublas_us']:8.1f} us ({figures['bf16_cublas_gb_per_s']:6.0f} GB/s)", flush=True)
        if args.sweep:
            x = torch.randn(1, in_features, device=device, generator=generator).to(dtype)
            grid = [(16, *blocks) for blocks in tuned_linear.INT8_CANDIDATES]
            grid += [(1, *blocks) for blocks in tuned_linear.ROW_CANDIDATES]
            if args.explore:  # beyond the tuner's choices, to pick its next candidates from
                grid += [(1, *blocks) for blocks in itertools.product((16, 32), (256, 512, 1024), (4, 8), (1, 3))
                         if (1, *blocks) not in grid]
            if args.quick:
                grid = grid[:2] + grid[-2:]
            timings = {}
            for blocks in grid:
                try:
                    timings[blocks] = per_call_us(lambda: triton_linear.linear(x, weight, scales, blocks=blocks), device)
                except Exception as error:  # a configuration the compiler rejects (shared memory): skip it
                    print(f"  blocks {blocks}: {type(error).__name__}", flush=True)
            best = min(timings, key=timings.get)
            tiled = min((blocks for blocks in timings if blocks[0] != 1), key=timings.get, default=None)
            row = min((blocks for blocks in timings if blocks[0] == 1), key=timings.get, default=None)
            entry = {"layer": name, "best": list(best), "best_us": timings[best],
                     "best_tiled": tiled and list(tiled), "best_row_kernel": row and list(row),
                     "all": {"/".join(map(str, key)): value for key, value in timings.items()}}
            results["sweep"].append(entry)
            described = "  ".join(f"{label} {blocks} {timings[blocks]:.1f} us ({weight.numel() / timings[blocks] / 1e3:.0f} GB/s)"
                                  for label, blocks in (("tiled", tiled), ("row kernel", row)) if blocks is not None)
            print(f"  sweep {name}, 1 row: {described}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
