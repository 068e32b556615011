"""Offline engine benchmark: our engine vs HF transformers `generate` on the same random checkpoint.

    python bench/throughput.py [--dtype float32 bfloat16] [--no-hf] [--json bench/results/throughput.json]
    python bench/throughput.py --dtype float32 float16 --int8 --llamacpp-converter CONVERT_HF_TO_GGUF.py

For each dtype, in one run on one machine: batch-1 decode (ms/token, tokens/s, achieved GB/s),
time to first token of a 128-token prompt, and output tokens/s of N concurrent requests
(128-token prompts, 128 new tokens; ours through the continuous-batching scheduler, HF as one
static batch; with --range-ratio R each request's lengths drawn from len x [1 - R, 1 + R], for
ours and llama.cpp). Prints ours/HF ratios and the absolute figures. The batch-1 figures are taken in
--rounds turns, every side once per round with all of them loaded (the host drifts by 10-20% over
minutes); each figure is a median over the rounds and each ratio the median of the rounds' ratios.
With --llamacpp-converter,
llama.cpp (llama-cpp-python, see starchat/bench/llamacpp.py) decodes the same checkpoint converted
to GGUF at the same type (f32/f16/bf16; q8_0 beside our --int8) in the same run: batch 1 and
the concurrent requests (its batch API, one KV sequence per request). With --ctranslate2,
CTranslate2 (starchat/bench/ctranslate2_baseline.py) does the same from its own conversion
(int8_float32 beside our --int8; the type it actually ran on this CPU is printed).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from starchat.bench.checkpoints import random_checkpoint
from starchat.bench.machine import describe_machine
from starchat.bench.offline import HFBaseline, interleave, median_latency, ours_latency, ours_throughput, round_ratios
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
    parser.add_argument("--range-ratio", type=float, default=0.0,
                        help="concurrent runs: each request's prompt and new-token lengths drawn uniformly from "
                             "len * (1 -/+ this), the same for every side (HF's static batch and CTranslate2 skip them)")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    parser.add_argument("--int8", action="store_true", help="also ours with --quantize int8 (bf16 activations)")
    parser.add_argument("--llamacpp-converter", type=Path, help="llama.cpp's convert_hf_to_gguf.py: adds llama.cpp")
    parser.add_argument("--ctranslate2", action="store_true", help="adds CTranslate2 (pip install ctranslate2)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="batch-1 figures: rounds of every side in turn; medians and per-round ratios are reported")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    model_dir = Path(args.model) if args.model else random_checkpoint(args.shape)
    results = {"machine": describe_machine(args.device), "model": str(model_dir),
               "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
               "runs": {}}
    print(f"machine: {results['machine']}\nmodel: {model_dir}", flush=True)
    runs = [(dtype, None) for dtype in args.dtype] + ([("bfloat16", "int8")] if args.int8 else [])
    for dtype, quantize in runs:
        run = _measure(args, model_dir, dtype, quantize)
        dtype = f"{dtype}+{quantize}" if quantize else dtype
        results["runs"][dtype] = run
        _print(dtype, run)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def _measure(args, model_dir: Path, dtype: str, quantize: str | None) -> dict:
    """One dtype's figures, every side loaded at once (they are freed when this returns)."""
    # Prefix caching off: every prompt token is computed, as by the baselines (a repeated prompt
    # would otherwise be found cached and its time to first token be that of its last block)
    llm = LLM(str(model_dir), dtype=dtype, device=args.device, progress=False, max_num_seqs=max(64, *args.concurrent),
              quantize=quantize, enable_prefix_caching=False)
    # Every side stays loaded so that the batch-1 figures can be taken in turns (offline.interleave).
    sides = {"ours": lambda: ours_latency(llm, args.new_tokens, args.prompt_len)}
    baseline = hf = None
    if args.llamacpp_converter:
        from starchat.bench.llamacpp import LlamaCppBaseline, convert_to_gguf

        outtype = "q8_0" if quantize else GGUF_TYPES[dtype]
        gguf = convert_to_gguf(model_dir, outtype, args.llamacpp_converter, model_dir.parent / "gguf")
        baseline = LlamaCppBaseline(gguf, threads=torch.get_num_threads())
        sides["llama.cpp"] = lambda: baseline.latency(args.new_tokens, args.prompt_len, gguf.stat().st_size)
    ct2 = None
    if args.ctranslate2:
        from starchat.bench.ctranslate2_baseline import CT2_TYPES, CTranslate2Baseline, convert_to_ctranslate2

        ct2_type = CT2_TYPES["int8" if quantize else dtype]
        ct2_dir = convert_to_ctranslate2(model_dir, ct2_type, model_dir.parent / "ctranslate2")
        ct2 = CTranslate2Baseline(ct2_dir, torch.get_num_threads(), ct2_type)
        sides["ctranslate2"] = lambda: ct2.latency(args.new_tokens, args.prompt_len, (ct2_dir / "model.bin").stat().st_size)
    if not args.no_hf and not quantize:
        hf = HFBaseline(model_dir, dtype, args.device)
        sides["hf"] = lambda: hf.latency(args.new_tokens, args.prompt_len)
    latencies = interleave(sides, args.rounds)
    run = {name: {"latency": median_latency(rounds).as_dict(), "latency_rounds": [r.as_dict() for r in rounds]}
           for name, rounds in latencies.items()}
    ours_rounds = [r.tokens_per_s for r in latencies["ours"]]
    run["ours_vs"] = {name: round_ratios(ours_rounds, [r.tokens_per_s for r in rounds])
                      for name, rounds in latencies.items() if name != "ours"}
    for n in args.concurrent:
        run["ours"][f"concurrent_{n}"] = ours_throughput(llm, n, args.prompt_len, args.new_tokens, args.range_ratio).as_dict()
        if baseline:
            run["llama.cpp"][f"concurrent_{n}"] = baseline.throughput(n, args.prompt_len, args.new_tokens,
                                                                      args.range_ratio).as_dict()
        if ct2 and not args.range_ratio:
            run["ctranslate2"][f"concurrent_{n}"] = ct2.throughput(n, args.prompt_len, args.new_tokens).as_dict()
        if hf and not args.range_ratio:
            run["hf"][f"concurrent_{n}"] = hf.throughput(n, args.prompt_len, args.new_tokens).as_dict()
    run["concurrent_range_ratio"], run["prompt_len"] = args.range_ratio, args.prompt_len
    if baseline:
        run["llama.cpp"]["type"] = outtype
    if ct2:
        run["ctranslate2"]["type"] = ct2.compute_type  # what it ran, after any fallback on this CPU
    return run


BASELINES = ("hf", "llama.cpp", "ctranslate2")


def _label(name: str, figures: dict) -> str:
    return "HF" if name == "hf" else f"{name} {figures['type']}"


def _ratio_text(ratios: list[float]) -> str:
    text = f"x{statistics.median(ratios):.2f}"
    return text + (f" (rounds x{min(ratios):.2f}-x{max(ratios):.2f})" if len(ratios) > 1 else "")


def _print(dtype: str, run: dict) -> None:
    ours = run["ours"]
    ttft_label = f"TTFT ms ({run.get('prompt_len', 128)}-token prompt)"
    print(f"\n== {dtype} == (batch-1: medians of {len(ours['latency_rounds'])} rounds taken in turns; "
          "ratio = median of the rounds' ratios)")
    print(f"{'batch-1 decode tokens/s':38s} ours {ours['latency']['tokens_per_s']:9.1f}   "
          f"({ours['latency']['achieved_gb_per_s']:.1f} GB/s, {ours['latency']['ms_per_token']:.1f} ms/token)")
    print(f"{ttft_label:38s} ours {ours['latency']['ttft_ms']:9.1f}")
    for name in BASELINES:
        if name not in run:
            continue
        theirs, label = run[name], _label(name, run[name])
        print(f"{'batch-1 decode tokens/s':38s} {label} {theirs['latency']['tokens_per_s']:9.1f}   "
              f"ours vs {label} {_ratio_text(run['ours_vs'][name])}")
        print(f"{ttft_label:38s} {label} {theirs['latency']['ttft_ms']:9.1f}")
    for key in ours:
        if key.startswith("concurrent_"):
            spread = f" (lengths +/-{run['concurrent_range_ratio']:.0%})" if run.get("concurrent_range_ratio") else ""
            label = f"{key.split('_')[1]} requests{spread}: output tokens/s"
            text = f"{label:38s} ours {ours[key]['output_tokens_per_s']:9.1f}"
            for name in BASELINES:
                if name in run and key in run[name]:
                    theirs = run[name][key]["output_tokens_per_s"]
                    text += f"   {_label(name, run[name])} {theirs:.1f} x{ours[key]['output_tokens_per_s'] / theirs:.2f}"
            print(text, flush=True)


if __name__ == "__main__":
    main()
