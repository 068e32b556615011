"""A model too large for two libraries in one process, on a CPU: ours with int8 weights against
llama.cpp with q8_0, each side loaded in a process of its own, the sides in turns.

    python bench/cpu_large_model.py --shape starchat-beta --llamacpp-converter .../convert_hf_to_gguf.py
           [--rounds 2] [--new-tokens 16] [--prompt-len 128] [--concurrent 4] [--json FILE]

StarChat-beta in int8 (15.5 GB) and in q8_0 (16.5 GB) do not both fit a 24 GiB machine, so
bench/throughput.py's way (every side loaded in one process, measured in turns) cannot run
here; HF transformers, which would hold the 31 GB of bfloat16 weights, is left out for the same
reason. Each round starts one process per side: it loads the model (the time and the peak RSS
are reported: llama.cpp maps its file, so its RSS counts the pages it touched), then measures
batch-1 decoding (ms/token from new_tokens + 1 tokens against 1, as bench/throughput.py), the
first token of a --prompt-len prompt, and --concurrent requests end to end (prompts of
--prompt-len, --new-tokens each; ours through its scheduler, llama.cpp through its batch API).
Figures are medians over the rounds, ratios the medians of each round's ratio (a round's two
processes run minutes apart: the host's drift falls on both sides of a round alike only roughly).
The checkpoint (random weights, HF layout, sharded safetensors: about 31 GB for StarChat-beta) and
its GGUF conversion are cached under STARCHAT_BENCH_CACHE (/tmp/starchat-bench).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from starchat.bench.checkpoints import bench_cache_dir, random_checkpoint
from starchat.bench.machine import describe_machine
from starchat.bench.offline import random_prompts

SIDES = ("ours", "llama.cpp")
KV_CACHE_BYTES = 1 << 30  # ours: plenty for the runs here; the default takes a share of free memory


def measure_side(side: str, model_dir: Path, gguf: Path | None, args: argparse.Namespace) -> dict:
    """Load one side in this process and measure it (the child's job). A prompt as long as the
    measured one is run first: a fresh process's first prefill of that size also pays for its
    memory's first touch."""
    warm_up = random_prompts(1, args.prompt_len, seed=7)[0]
    start = time.perf_counter()
    if side == "ours":
        from starchat.bench.offline import ours_latency, ours_throughput
        from starchat.llm import LLM
        from starchat.sampling_params import SamplingParams

        llm = LLM(str(model_dir), dtype="bfloat16", device="cpu", quantize="int8", progress=False,
                  max_num_seqs=max(args.concurrent, 1), kv_cache_memory_bytes=KV_CACHE_BYTES)
        load_seconds = time.perf_counter() - start
        llm.generate([warm_up], SamplingParams(max_new_tokens=1))
        latency = ours_latency(llm, args.new_tokens, args.prompt_len, repeats=args.repeats)
        throughput = ours_throughput(llm, args.concurrent, args.prompt_len, args.new_tokens) if args.concurrent else None
    else:
        from starchat.bench.llamacpp import LlamaCppBaseline

        baseline = LlamaCppBaseline(gguf, threads=torch.get_num_threads(), context=args.prompt_len + args.new_tokens + 64)
        load_seconds = time.perf_counter() - start
        baseline.first_tokens(warm_up, 1)
        latency = baseline.latency(args.new_tokens, args.prompt_len, gguf.stat().st_size, repeats=args.repeats)
        throughput = baseline.throughput(args.concurrent, args.prompt_len, args.new_tokens) if args.concurrent else None
    return {"side": side, "process": os.getpid(), "load_s": load_seconds,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
            "latency": latency.as_dict(), "throughput": throughput.as_dict() if throughput else None}


def run_child(side: str, model_dir: Path, gguf: Path | None, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--child", side, "--model-dir", str(model_dir),
               "--new-tokens", str(args.new_tokens), "--prompt-len", str(args.prompt_len),
               "--concurrent", str(args.concurrent), "--repeats", str(args.repeats)]
    if gguf is not None:
        command += ["--gguf", str(gguf)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.child_timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{side}: the measuring process failed ({done.returncode}): "
                           f"{done.stderr.strip().splitlines()[-3:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(rounds: dict[str, list[dict]]) -> dict:
    def figure(side: str, path: tuple[str, ...]) -> list[float]:
        values = []
        for result in rounds[side]:
            value = result
            for key in path:
                value = value[key]
            values.append(value)
        return values

    paths = {"batch-1 tokens/s": ("latency", "tokens_per_s"), "ms/token": ("latency", "ms_per_token"),
             "achieved GB/s": ("latency", "achieved_gb_per_s"), "first token, ms": ("latency", "ttft_ms"),
             "load, s": ("load_s",), "peak RSS, GiB": ("peak_rss_gib",)}
    if rounds[SIDES[0]][0]["throughput"]:
        paths["concurrent, output tokens/s"] = ("throughput", "output_tokens_per_s")
    summary: dict = {"medians": {side: {name: statistics.median(figure(side, path)) for name, path in paths.items()}
                                 for side in rounds}}
    if all(side in rounds for side in SIDES):
        # Higher is better for rates; for times the ratio is theirs / ours, so > 1 means ours is faster.
        better = {"batch-1 tokens/s": 1, "first token, ms": -1, "concurrent, output tokens/s": 1}
        summary["ours_vs_llamacpp"] = {}
        for name, sign in better.items():
            if name not in paths:
                continue
            ours, theirs = figure("ours", paths[name]), figure("llama.cpp", paths[name])
            ratios = [(a / b) ** sign for a, b in zip(ours, theirs)]
            summary["ours_vs_llamacpp"][name] = {"median": statistics.median(ratios), "rounds": ratios}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="starchat-beta")
    parser.add_argument("--model-dir", type=Path, help="a checkpoint folder instead of the shape's random one")
    parser.add_argument("--llamacpp-converter", type=Path, help="llama.cpp's convert_hf_to_gguf.py: adds llama.cpp (q8_0)")
    parser.add_argument("--gguf", type=Path, help="an already converted q8_0 GGUF of the same checkpoint")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--concurrent", type=int, default=4, help="requests run together end to end (0: none)")
    parser.add_argument("--repeats", type=int, default=1, help="batch-1 timings per round (medians)")
    parser.add_argument("--child-timeout", type=float, default=1800)
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--json")
    args = parser.parse_args()

    model_dir = args.model_dir or random_checkpoint(args.shape)
    if args.child:
        print(json.dumps(measure_side(args.child, model_dir, args.gguf, args)))
        return

    sides = ["ours"]
    gguf = args.gguf
    if gguf is None and args.llamacpp_converter:
        from starchat.bench.llamacpp import convert_to_gguf

        print("converting the checkpoint to GGUF q8_0 (cached) ...", flush=True)
        gguf = convert_to_gguf(model_dir, "q8_0", args.llamacpp_converter, bench_cache_dir() / "gguf")
    if gguf is not None:
        sides.append("llama.cpp")
    machine = describe_machine()
    print(machine, flush=True)
    rounds: dict[str, list[dict]] = {side: [] for side in sides}
    for number in range(args.rounds):
        for side in sides:
            result = run_child(side, model_dir, gguf, args)
            rounds[side].append(result)
            latency, throughput = result["latency"], result["throughput"]
            print(f"round {number + 1} {side:9s}: load {result['load_s']:6.1f} s, peak RSS {result['peak_rss_gib']:5.2f} GiB, "
                  f"batch-1 {latency['ms_per_token']:7.1f} ms/token ({latency['achieved_gb_per_s']:.1f} GB/s), "
                  f"first token of {args.prompt_len} {latency['ttft_ms'] / 1e3:6.2f} s"
                  + (f", {args.concurrent} requests {throughput['output_tokens_per_s']:.2f} output tokens/s" if throughput else ""),
                  flush=True)
    summary = summarize(rounds)
    for side, medians in summary["medians"].items():
        print(f"{side:9s} medians: " + ", ".join(f"{name} {value:.2f}" for name, value in medians.items()))
    for name, ratio in summary.get("ours_vs_llamacpp", {}).items():
        print(f"ours / llama.cpp, {name}: x{ratio['median']:.2f} (rounds {', '.join(f'{r:.2f}' for r in ratio['rounds'])})")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "model": str(model_dir), "gguf": str(gguf) if gguf else None,
                                               "arguments": {k: str(v) for k, v in vars(args).items()},
                                               "rounds": rounds, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
