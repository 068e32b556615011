"""CPU matrix products: starchat's native kernels (packed weights) vs PyTorch's, on a whole model's weights.

    python bench/cpu_kernels.py [--shape tiny_starcoder] [--rows 1 4 8 16 32 128] [--dtype float32 float16 bfloat16 int8]

Decoding reads every weight once per step, so the benchmark cycles through one model's worth of
weight matrices (more than the CPU's caches hold) instead of repeating one small matrix that
stays in cache. For each dtype and row count: milliseconds per pass over all weights, achieved
GB/s and GFLOP/s, and the ratio PyTorch time / native time, measured in the same run. PyTorch's
product is what the engine uses without the kernels (cpu_linear.CpuLinear, quant.Int8Linear):
F.linear in the weight dtype, float32 for 16-bit weights from 8 rows, and int8 weights
dequantized to float32 for the call.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from starchat.config import NAMED_SHAPES as SHAPES, linear_weight_shapes
from starchat.bench.machine import describe_machine
from starchat.model import native
from starchat.model.cpu_linear import ROWS_FOR_FLOAT32
from starchat.model.quant import quantize_per_channel


def weight_shapes(shape: dict) -> list[tuple[int, int]]:
    """Every Linear weight of the model, in the order a decode step reads them."""
    layers = linear_weight_shapes(shape)
    lm_head = layers.pop("lm_head")
    return list(layers.values()) * shape["n_layer"] + [lm_head]


def torch_product(x, layer):
    weight, scales = layer["weight"], layer["scales"]
    if scales is not None:
        return F.linear(x, weight.float() * scales[:, None])
    if weight.dtype != torch.float32 and x.shape[0] >= ROWS_FOR_FLOAT32:
        return F.linear(x, weight.float())
    return F.linear(x.to(weight.dtype), weight)


def native_product(x, layer):
    return native.linear(x, layer["packed"], layer["weight"].shape[0], None, layer["scales"])


def time_pass(fn, layers, xs, repeats) -> float:
    for layer in layers:  # warm-up pass
        fn(xs[layer["weight"].shape[1]], layer)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for layer in layers:
            fn(xs[layer["weight"].shape[1]], layer)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny_starcoder", choices=sorted(SHAPES))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 128])
    parser.add_argument("--dtype", nargs="+", default=["float32", "float16", "bfloat16", "int8"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if not native.available():
        raise SystemExit("native kernels unavailable (no C compiler, or STARCHAT_NATIVE_KERNELS=0)")

    shapes = weight_shapes(SHAPES[args.shape])
    results = {"machine": describe_machine("cpu"), "shape": args.shape, "threads": torch.get_num_threads(), "rows": {}}
    print(f"machine: {results['machine']}\nshape: {args.shape}, {len(shapes)} matrices, threads {results['threads']}")
    print(f"{'dtype':9} {'rows':>4} {'native ms':>10} {'GB/s':>6} {'GFLOP/s':>8} {'torch ms':>9} {'GB/s':>6} {'GFLOP/s':>8} "
          f"{'torch/native':>12}")
    generator = torch.Generator().manual_seed(0)
    for dtype_name in args.dtype:
        layers = []
        for out_features, in_features in shapes:
            weight = torch.randn(out_features, in_features, generator=generator) * 0.02
            if dtype_name == "int8":
                weight, scales = quantize_per_channel(weight)
            else:
                weight, scales = weight.to(getattr(torch, dtype_name)), None
            layers.append({"weight": weight, "scales": scales, "packed": native.pack_weight(weight)})
        gigabytes = sum(layer["weight"].numel() * layer["weight"].element_size() for layer in layers) / 1e9
        for rows in args.rows:
            gigaflops = 2 * rows * sum(n * k for n, k in shapes) / 1e9
            xs = {k: torch.randn(rows, k, generator=generator) for k in {s[1] for s in shapes}}
            ours = time_pass(native_product, layers, xs, args.repeats)
            theirs = time_pass(torch_product, layers, xs, args.repeats)
            results["rows"][f"{dtype_name}/{rows}"] = {
                "native_ms": ours * 1e3, "torch_ms": theirs * 1e3, "native_gbps": gigabytes / ours,
                "torch_gbps": gigabytes / theirs, "native_gflops": gigaflops / ours, "torch_gflops": gigaflops / theirs}
            print(f"{dtype_name:9} {rows:>4} {ours * 1e3:>10.2f} {gigabytes / ours:>6.1f} {gigaflops / ours:>8.1f} "
                  f"{theirs * 1e3:>9.2f} {gigabytes / theirs:>6.1f} {gigaflops / theirs:>8.1f} {theirs / ours:>11.2f}x",
                  flush=True)
        del layers
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
