"""One layer's products on a CPU with AMX: the panels' AMX tiles (native/amx.c) against the native
kernel's AVX tiles, on a named shape's four weights (c_attn, attn.c_proj, c_fc, mlp.c_proj).

    python bench/cpu_amx_layer.py [--shape starchat-beta] [--rows 16 64 512] [--stream]
                                  [--dtype bfloat16 float16 int8] [--repeats 3] [--json PATH]

For each weight type and row count, the four products with their biases (and int8 scales) are
timed both ways in turns, best of --repeats, in the same process; prints milliseconds, the ratio
native / AMX, achieved GB/s of weights and TFLOP/s, and the machine. bfloat16 and int8
activations are rounded to bfloat16 on the AMX side; float16 weights run as two exact bfloat16
halves against activations kept to 16 bits (docs/ENGINE.md). Needs a CPU with AMX granted by the
kernel (else it says so and stops). StarChat-beta's layer is 0.68 GB in 16 bits: the native side
of 512 rows takes seconds per product.

One layer's weights stay in the caches between repeats, so this measures the products' arithmetic.
With --stream, every layer gets its own weights and the lm_head is added, all backed by 2 MiB
pages as the engine's are, and each repeat runs all of them in order, as a decode step reads the
model (tiny_starcoder: 328 MB in 16 bits; too large for StarChat-beta's shape): what decode
steps of many sequences cost in products, against the one-row kernel's rate over the same
weights, the memory's rate for this access pattern (printed first).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from starchat.bench.machine import describe_machine  # noqa: E402
from starchat.config import NAMED_SHAPES, linear_weight_shapes  # noqa: E402
from starchat.engine.host_memory import collapse_into_huge_pages  # noqa: E402
from starchat.model import native  # noqa: E402
from starchat.model.quant import quantize_per_channel  # noqa: E402


def packed_weight(out_features: int, in_features: int, dtype: str, generator: torch.Generator, bias: bool) -> dict:
    """A random weight stored as `dtype` (int8: per-channel scales), packed, with its bias."""
    weight = torch.randn(out_features, in_features, generator=generator) * in_features ** -0.5
    scales = None
    if dtype == "int8":
        weight, scales = quantize_per_channel(weight)
    else:
        weight = weight.to(getattr(torch, dtype))
    return {"packed": native.pack_weight(weight), "out": out_features, "in": in_features, "scales": scales,
            "bias": torch.randn(out_features, generator=generator) if bias else None,
            "bytes": weight.numel() * weight.element_size()}


def layer_weights(shape: dict, dtype: str, generator: torch.Generator) -> list[dict]:
    return [packed_weight(out_features, in_features, dtype, generator, bias=True)
            for name, (out_features, in_features) in linear_weight_shapes(shape).items() if name != "lm_head"]


def model_weights(shape: dict, dtype: str, generator: torch.Generator) -> list[dict]:
    """Every layer's four weights (each its own) and the lm_head, packed, in 2 MiB pages."""
    weights = [w for _ in range(shape["n_layer"]) for w in layer_weights(shape, dtype, generator)]
    weights.append(packed_weight(*linear_weight_shapes(shape)["lm_head"], dtype, generator, bias=False))
    collapse_into_huge_pages([w["packed"] for w in weights])
    return weights


def time_layer(weights: list[dict], inputs: dict[int, torch.Tensor], amx_min_rows: int) -> float:
    start = time.perf_counter()
    for w in weights:
        native.linear(inputs[w["in"]], w["packed"], w["out"], w["bias"], w["scales"], amx_min_rows)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="starchat-beta", choices=sorted(NAMED_SHAPES))
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 64, 512])
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float16", "int8"], choices=["bfloat16", "float16", "int8"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stream", action="store_true", help="all layers' own weights and the lm_head, in order")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.stream and args.shape == "starchat-beta":
        parser.error("--stream builds the whole model: use a small shape (tiny_starcoder)")
    if not native.available() or not native.amx_init():
        sys.exit("no AMX tiles here (a CPU without AMX, no C compiler, or the kernel refused the tile state)")
    machine = describe_machine("cpu")
    what = "every layer's products and the lm_head, streamed" if args.stream else "one layer's four products with biases"
    print(f"machine: {machine}; shape {args.shape}, {what}")
    shape, generator = NAMED_SHAPES[args.shape], torch.Generator().manual_seed(0)
    results = {"machine": machine, "shape": args.shape, "stream": args.stream, "figures": {}}
    for dtype in args.dtype:
        weights = (model_weights if args.stream else layer_weights)(shape, dtype, generator)
        weight_bytes = sum(w["bytes"] for w in weights)
        flops_per_row = 2 * sum(w["out"] * w["in"] for w in weights)
        if args.stream:
            one_row = {w["in"]: torch.randn(1, w["in"], generator=generator) for w in weights}
            seconds = min(time_layer(weights, one_row, 0) for _ in range(args.repeats + 1))
            results["figures"][f"{dtype}/1"] = {"ms_native": 1e3 * seconds}
            print(f"{dtype}, 1 row (the one-row kernel): {1e3 * seconds:.2f} ms, {weight_bytes / seconds / 1e9:.1f} GB/s of weights")
        for rows in args.rows:
            inputs = {w["in"]: torch.randn(rows, w["in"], generator=generator) for w in weights}
            best = {"amx": float("inf"), "native": float("inf")}
            for repeat in range(args.repeats + 1):  # the first round warms both sides up
                for side in (("amx", "native") if repeat % 2 == 0 else ("native", "amx")):
                    seconds = time_layer(weights, inputs, 1 if side == "amx" else 0)
                    if repeat:
                        best[side] = min(best[side], seconds)
            amx, plain = best["amx"], best["native"]
            results["figures"][f"{dtype}/{rows}"] = {"ms_amx": 1e3 * amx, "ms_native": 1e3 * plain,
                                                     "speedup": plain / amx}
            print(f"{dtype}, {rows} rows: AMX {1e3 * amx:.2f} ms, native {1e3 * plain:.2f} ms -> x{plain / amx:.2f}; "
                  f"AMX {weight_bytes / amx / 1e9:.1f} GB/s of weights, {rows * flops_per_row / amx / 1e12:.2f} TFLOP/s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
