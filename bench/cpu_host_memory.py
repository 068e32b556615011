"""Host memory settings for CPU inference (starchat/engine/host_memory.py) on and off, end to end.

    python bench/cpu_host_memory.py [--setting malloc|huge-pages] [--shape tiny_starcoder]
                                    [--dtype bfloat16] [--quantize int8] [--prompt-tokens 512 1024 2048]
                                    [--concurrent 32 128] [--repeats 4] [--rounds 2] [--json PATH]

--setting malloc: glibc's malloc thresholds (the off side with STARCHAT_MALLOC_TUNING=0);
huge-pages: the packed weights collapsed into 2 MiB pages (STARCHAT_HUGE_PAGES=0). The settings
are per process, so each side runs in a fresh process, the two alternating for --rounds rounds.
In each process: batch-1 decode (128 new tokens after a 16-token prompt) --repeats times; for
each prompt length, the time to the first token (prefill plus one step) --repeats times after a
warm-up, with the minor page faults of each; then output tokens/s of --concurrent requests
(64-token prompts, 32 new). A figure is the median over a side's repeats of all rounds; faults
are per run. Prefix caching is off. Prints the machine.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def child(args: argparse.Namespace) -> None:
    import torch

    from starchat import LLM, SamplingParams
    from starchat.bench.checkpoints import random_checkpoint
    from starchat.bench.offline import random_prompts
    from starchat.engine import host_memory

    path = random_checkpoint(args.shape, torch.bfloat16)
    llm = LLM(str(path), dtype=args.dtype, device="cpu", progress=False, enable_prefix_caching=False, quantize=args.quantize,
              max_num_batched_tokens=max(args.prompt_tokens), max_num_seqs=max(args.concurrent, default=64))
    generator = torch.Generator().manual_seed(0)
    huge_kib = next(int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages:"))
    applied = host_memory.keep_freed_host_memory() if args.setting == "malloc" else huge_kib > 0
    results = {"applied": applied, "huge_pages_mib": huge_kib / 1024, "decode": [], "ttft": {}, "faults": {},
               "throughput": {}}
    decode, short = SamplingParams(max_new_tokens=128, ignore_eos=True), list(range(100, 116))
    llm.generate([short], decode)  # warm-up
    for _ in range(args.repeats):
        start = time.perf_counter()
        llm.generate([short], decode)
        results["decode"].append(128 / (time.perf_counter() - start))
    first = SamplingParams(max_new_tokens=1, ignore_eos=True)
    for tokens in args.prompt_tokens:
        prompt = torch.randint(100, 40000, (tokens,), generator=generator).tolist()
        llm.generate([prompt], first)  # warm-up
        times, faults = [], []
        for _ in range(args.repeats):
            before, start = minor_faults(), time.perf_counter()
            llm.generate([prompt], first)
            times.append(time.perf_counter() - start)
            faults.append(minor_faults() - before)
        results["ttft"][tokens], results["faults"][tokens] = times, faults
    for count in args.concurrent:
        requests = random_prompts(count, 64)
        params = SamplingParams(max_new_tokens=32, ignore_eos=True)
        llm.generate(requests[:2], SamplingParams(max_new_tokens=4, ignore_eos=True))
        rates = []
        for _ in range(max(1, args.repeats // 2)):
            start = time.perf_counter()
            llm.generate(requests, params)
            rates.append(count * 32 / (time.perf_counter() - start))
        results["throughput"][count] = rates
    print(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=["malloc", "huge-pages"], default="malloc")
    parser.add_argument("--shape", default="tiny_starcoder")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantize", choices=["int8"], default=None)
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--concurrent", type=int, nargs="*", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from starchat.bench.machine import describe_machine

    machine = describe_machine("cpu")
    print(f"machine: {machine}; {args.shape} in {args.dtype}{' quantized to ' + args.quantize if args.quantize else ''}")
    variable = "STARCHAT_MALLOC_TUNING" if args.setting == "malloc" else "STARCHAT_HUGE_PAGES"
    command = [sys.executable, __file__, "--child", "--setting", args.setting, "--shape", args.shape, "--dtype", args.dtype, "--repeats",
               str(args.repeats), "--prompt-tokens", *map(str, args.prompt_tokens), "--concurrent", *map(str, args.concurrent)]
    if args.quantize:
        command += ["--quantize", args.quantize]
    runs: dict[str, list[dict]] = {"on": [], "off": []}
    for round_index in range(args.rounds):
        for side in (("on", "off") if round_index % 2 == 0 else ("off", "on")):
            env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
            env[variable] = "1" if side == "on" else "0"
            output = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
            runs[side].append(json.loads(output.strip().splitlines()[-1]))
    results = {"machine": machine, "setting": args.setting, "shape": args.shape, "dtype": args.dtype,
               "quantize": args.quantize, "runs": runs,
               "figures": {}}
    assert all(run["applied"] for run in runs["on"]) and not any(run["applied"] for run in runs["off"])
    on = statistics.median(r for run in runs["on"] for r in run["decode"])
    off = statistics.median(r for run in runs["off"] for r in run["decode"])
    results["figures"]["decode_batch_1"] = {"tokens_per_s_on": on, "tokens_per_s_off": off, "speedup": on / off}
    print(f"batch-1 decode: {on:.1f} tokens/s on against {off:.1f} off -> x{on / off:.2f}")
    for tokens in args.prompt_tokens:
        key = str(tokens)
        on = statistics.median(t for run in runs["on"] for t in run["ttft"][key])
        off = statistics.median(t for run in runs["off"] for t in run["ttft"][key])
        faults_on = [f for run in runs["on"] for f in run["faults"][key]]
        faults_off = [f for run in runs["off"] for f in run["faults"][key]]
        results["figures"][f"ttft_{tokens}"] = {"ms_on": 1e3 * on, "ms_off": 1e3 * off, "speedup": off / on,
                                                "faults_on": faults_on, "faults_off": faults_off}
        print(f"{tokens}-token prompt, first token: {1e3 * on:.0f} ms on against {1e3 * off:.0f} ms off "
              f"-> x{off / on:.2f}; minor faults per run {min(faults_on)}-{max(faults_on)} against "
              f"{min(faults_off)}-{max(faults_off)}")
    for count in args.concurrent:
        key = str(count)
        on = statistics.median(r for run in runs["on"] for r in run["throughput"][key])
        off = statistics.median(r for run in runs["off"] for r in run["throughput"][key])
        results["figures"][f"requests_{count}"] = {"tokens_per_s_on": on, "tokens_per_s_off": off, "speedup": on / off}
        print(f"{count} requests (64-token prompts, 32 new): {on:.0f} output tokens/s on against {off:.0f} off -> "
              f"x{on / off:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
