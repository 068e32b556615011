"""Offline engine benchmark: our engine vs HF transformers `generate` on the same random checkpoint.

    python bench/throughput.py [--dtype float32 bfloat16] [--no-hf] [--json bench/results/throughput.json]
    python bench/throughput.py --dtype float32 float16 --int8 --llamacpp-converter CONVERT_HF_TO_GGUF.py

For each dtype, in one run on one machine: batch-1 decode (ms/token, tokens/s, achieved GB/s),
time to first token of a 128-token prompt, and output tokens/s of N concurrent requests
(128-token prompts, 128 new tokens; ours through the continuous-batching scheduler, HF as one
static batch). Prints ours/HF ratios and the absolute figures. With --llamacpp-converter,
llama.cpp (llama-cpp-python, see starchat/bench/llamacpp.py) decodes the same checkpoint converted
to GGUF at the same type (f32/f16/bf16; q8_0 beside our --int8) in the same run: batch 1 and
the concurrent requests (its batch API, one KV sequence per request).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from starchat.bench.checkpoints import random_checkpoint
from starchat.bench.machine import describe_machine
from starchat.bench.offline import HFBaseline, ours_latency, ours_throughput
from starchat.llm import LLM


GGUF_TYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny_starcoder")
    parser.add_argument("--model", help="a real checkpoint folder instead of a random one")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--concurrent", type=int, nargs="+", default=[32])
    parser.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    parser.add_argument("--int8", action="store_true", help="also ours with --quantize int8 (bf16 activations)")
    parser.add_argument("--llamacpp-converter", type=Path, help="llama.cpp's convert_hf_to_gguf.py: adds llama.cpp")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    model_dir = Path(args.model) if args.model else random_checkpoint(args.shape)
    results = {"machine": describe_machine(args.device), "model": str(model_dir),
               "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
               "runs": {}}
    print(f"machine: {results['machine']}\nmodel: {model_dir}", flush=True)
    runs = [(dtype, None) for dtype in args.dtype] + ([("bfloat16", "int8")] if args.int8 else [])
    for dtype, quantize in runs:
        llm = LLM(str(model_dir), dtype=dtype, device=args.device, progress=False, max_num_seqs=max(64, *args.concurrent),
                  quantize=quantize)
        run = {"ours": {"latency": ours_latency(llm, args.new_tokens, args.prompt_len).as_dict()}}
        for n in args.concurrent:
            run["ours"][f"concurrent_{n}"] = ours_throughput(llm, n, args.prompt_len, args.new_tokens).as_dict()
        del llm
        if args.llamacpp_converter:
            from starchat.bench.llamacpp import LlamaCppBaseline, convert_to_gguf

            outtype = "q8_0" if quantize else GGUF_TYPES[dtype]
            gguf = convert_to_gguf(model_dir, outtype, args.llamacpp_converter, model_dir.parent / "gguf")
            baseline = LlamaCppBaseline(gguf, threads=torch.get_num_threads())
            run["llama.cpp"] = {"type": outtype, "latency": baseline.latency(args.new_tokens, args.prompt_len,
                                                                            gguf.stat().st_size).as_dict()}
            for n in args.concurrent:
                run["llama.cpp"][f"concurrent_{n}"] = baseline.throughput(n, args.prompt_len, args.new_tokens).as_dict()
            del baseline
        dtype = f"{dtype}+{quantize}" if quantize else dtype
        if not args.no_hf and not quantize:
            hf = HFBaseline(model_dir, dtype, args.device)
            run["hf"] = {"latency": hf.latency(args.new_tokens, args.prompt_len).as_dict()}
            for n in args.concurrent:
                run["hf"][f"concurrent_{n}"] = hf.throughput(n, args.prompt_len, args.new_tokens).as_dict()
            del hf
        results["runs"][dtype] = run
        _print(dtype, run)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def _print(dtype: str, run: dict) -> None:
    ours, hf = run["ours"], run.get("hf")
    lines = [("batch-1 decode tokens/s", ours["latency"]["tokens_per_s"], hf and hf["latency"]["tokens_per_s"]),
             ("batch-1 ms/token", ours["latency"]["ms_per_token"], hf and hf["latency"]["ms_per_token"]),
             ("batch-1 achieved GB/s", ours["latency"]["achieved_gb_per_s"], hf and hf["latency"]["achieved_gb_per_s"]),
             ("TTFT ms (128-token prompt)", ours["latency"]["ttft_ms"], hf and hf["latency"]["ttft_ms"])]
    for key in ours:
        if key.startswith("concurrent_"):
            lines.append((f"{key.split('_')[1]} requests: output tokens/s", ours[key]["output_tokens_per_s"],
                          hf and hf[key]["output_tokens_per_s"]))
    print(f"\n== {dtype} ==")
    for name, mine, theirs in lines:
        text = f"{name:38s} ours {mine:9.1f}"
        if theirs:
            ratio = theirs / mine if "ms" in name else mine / theirs
            text += f"   HF {theirs:9.1f}   ours vs HF x{ratio:.2f}"
        print(text, flush=True)
    if "llama.cpp" in run:
        theirs, mine = run["llama.cpp"]["latency"], ours["latency"]
        print(f"{'batch-1 decode tokens/s':38s} ours {mine['tokens_per_s']:9.1f}   llama.cpp {run['llama.cpp']['type']} "
              f"{theirs['tokens_per_s']:9.1f}   ours vs llama.cpp x{mine['tokens_per_s'] / theirs['tokens_per_s']:.2f}")
        print(f"{'TTFT ms (128-token prompt)':38s} ours {mine['ttft_ms']:9.1f}   llama.cpp {theirs['ttft_ms']:9.1f}", flush=True)
        for key, value in run["llama.cpp"].items():
            if key.startswith("concurrent_"):
                mine_n, theirs_n = ours[key]["output_tokens_per_s"], value["output_tokens_per_s"]
                print(f"{key.split('_')[1] + ' requests: output tokens/s':38s} ours {mine_n:9.1f}   llama.cpp {theirs_n:9.1f}"
                      f"   ours vs llama.cpp x{mine_n / theirs_n:.2f}", flush=True)


if __name__ == "__main__":
    main()
