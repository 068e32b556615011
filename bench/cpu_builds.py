"""The native CPU kernels built two ways on this machine, end to end, in turns: as the engine
builds them (-march=native) against a build with extra compiler flags (default -mno-avx512f: the
8-wide AVX2 tiles on a CPU that has AVX-512).

    python bench/cpu_builds.py [--flags="-mno-avx512f"] [--rounds 2] [--json PATH]

Each round runs one child process per build (each build in its own cache folder): a random
tiny_starcoder-shape float16 checkpoint (float16 keeps the native kernel for prefill on any
CPU; bfloat16 and int8 would take the AMX path where the CPU has one) and the embedded
starchat-nano, time to the first token of a 512-token prompt (best of 3) and output tokens/s of
32 concurrent requests (64-token prompts, 32 new tokens). Prints each round, the medians and
their ratios, and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, sys, time, torch
from starchat import LLM, SamplingParams
from starchat.bench.checkpoints import random_checkpoint
from starchat.model import native
from starchat.model.loader import EMBEDDED_MODEL_DIR
generator = torch.Generator().manual_seed(0)
figures = {"avx512_tiles": bool(native.load().starchat_linear_has_avx512())}
for name, path in (("starchat-nano", EMBEDDED_MODEL_DIR), ("tiny_starcoder", random_checkpoint("tiny_starcoder", torch.float16))):
    llm = LLM(str(path), dtype="float16", device="cpu", progress=False, enable_prefix_caching=False)
    prompt = torch.randint(100, 40000, (512,), generator=generator).tolist()
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    llm.generate([prompt], one)
    times = []
    for _ in range(3):
        start = time.perf_counter(); llm.generate([prompt], one); times.append(time.perf_counter() - start)
    prompts = [torch.randint(100, 40000, (64,), generator=generator).tolist() for _ in range(32)]
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    llm.generate(prompts[:2], params)
    start = time.perf_counter(); llm.generate(prompts, params); seconds = time.perf_counter() - start
    figures[name] = {"ttft_512_ms": 1e3 * min(times), "tokens_per_s_32": 32 * 32 / seconds}
print(json.dumps(figures))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flags", default="-mno-avx512f", help="extra compiler flags of the other build")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from starchat.bench.machine import describe_machine

    runs: dict[str, list[dict]] = {"native": [], "flags": []}
    with tempfile.TemporaryDirectory() as caches:
        for round_index in range(args.rounds):
            for side in (("native", "flags") if round_index % 2 == 0 else ("flags", "native")):
                env = {**os.environ, "STARCHAT_CACHE_DIR": str(Path(caches) / side), "PYTHONPATH": str(REPO)}
                env["STARCHAT_NATIVE_CFLAGS"] = args.flags if side == "flags" else ""
                result = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                                        check=True)
                runs[side].append(json.loads(result.stdout.strip().splitlines()[-1]))
                print(f"round {round_index + 1}, {side} build: {runs[side][-1]}", flush=True)
    summary = {}
    for model in ("starchat-nano", "tiny_starcoder"):
        for figure in ("ttft_512_ms", "tokens_per_s_32"):
            native = statistics.median(run[model][figure] for run in runs["native"])
            other = statistics.median(run[model][figure] for run in runs["flags"])
            ratio = other / native if figure.endswith("_ms") else native / other
            summary[f"{model}/{figure}"] = {"native": native, "flags": other, "native_speedup": ratio}
            print(f"{model} {figure}: native build {native:.1f}, {args.flags} build {other:.1f} -> x{ratio:.2f}")
    machine = describe_machine("cpu")
    print(f"machine: {machine}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "flags": args.flags, "runs": runs, "summary": summary},
                                        indent=1))


if __name__ == "__main__":
    main()
