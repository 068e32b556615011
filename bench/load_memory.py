"""Peak host memory while loading a checkpoint, against the size of the loaded weights.

    python bench/load_memory.py [--shape tiny_starcoder] [--dtype bfloat16 float32]
    python bench/load_memory.py --shape starchat-beta --dtype bfloat16 --quantize int8   # ~31 GB written first
    python bench/load_memory.py --model-dir DIR --dtype bfloat16       # DIR from `starchat quantize`: int8 as stored

Each load runs in a fresh subprocess; the figure is (peak RSS during load - RSS before load) /
(bytes of the loaded parameters). The target is under 1.3: no whole-model float32 copy.
Weights stored in bf16 loaded as float32 double in size on the way, one tensor at a time.
With --quantize int8 each weight is quantized as it arrives; the figure that matters then is the
absolute peak (StarChat-beta in int8 must load in under 20 GB of host memory).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from starchat.bench.checkpoints import random_checkpoint
from starchat.bench.machine import describe_machine
from starchat.config import ModelConfig
from starchat.model.quantized_checkpoint import checkpoint_quantization

CHILD = r"""
import json, resource, sys, torch
from starchat.engine.devices import resolve_dtype
from starchat.model.loader import load_model
def rss_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
before = rss_kib()
import time
start = time.perf_counter()
quantize = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "none" else None
model = load_model(__import__("pathlib").Path(sys.argv[1]), resolve_dtype(sys.argv[2], torch.device("cpu")), torch.device("cpu"),
                   progress=False, quantize=quantize)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, whole process lifetime
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"rss_before_mib": before / 1024, "peak_rss_mib": peak / 1024, "weights_mib": weights / 2**20,
                  "peak_over_weights": (peak - before) * 1024 / weights, "load_s": seconds}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="tiny_starcoder")
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--quantize", choices=["int8"], help="quantize while loading")
    parser.add_argument("--model-dir", type=Path, help="a checkpoint folder instead of the shape's random one "
                                                        "(e.g. one written by `starchat quantize`)")
    parser.add_argument("--json")
    args = parser.parse_args()
    model_dir = args.model_dir or random_checkpoint(args.shape)
    stored = ModelConfig.from_file(model_dir / "config.json").torch_dtype
    stored_quantization = checkpoint_quantization(model_dir)
    results = {"machine": describe_machine(), "model": str(model_dir), "stored_dtype": stored,
               "stored_quantization": stored_quantization,
               "quantize": args.quantize, "runs": {}}
    for dtype in args.dtype:
        output = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), dtype, args.quantize or "none"],
                                capture_output=True, text=True, check=True)
        figures = json.loads(output.stdout.strip().splitlines()[-1])
        results["runs"][dtype] = figures
        print(f"{model_dir.name} stored {stored}{' (' + stored_quantization + ')' if stored_quantization else ''}, loaded as {dtype:9s}{' + ' + args.quantize if args.quantize else ''}: "
              f"weights {figures['weights_mib']:8.1f} MiB, peak RSS {figures['peak_rss_mib'] / 1024:.2f} GiB, "
              f"peak growth {figures['peak_over_weights']:.2f}x the weights (target < 1.3), "
              f"loaded in {figures['load_s']:.1f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
