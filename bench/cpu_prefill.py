"""AMX on a CPU: products on AMX tiles (from the packed panels, native/amx.c, and for large prompt
chunks oneDNN's, cpu_linear.PackedLinear._amx_forward) and prompt and decode attention on tiles
(native/prompt_attention.c, amx.c) against the native kernels and float32 prompt attention, on one
engine, in turns.

    python bench/cpu_prefill.py [--shape tiny_starcoder] [--prompt-tokens 128 512 1024]
                                [--concurrent 8 32 128] [--weights bfloat16 int8 float16]
                                [--rounds 3] [--json PATH]

A random checkpoint of the shape (bfloat16; loaded as it is, quantized to int8 with bfloat16
activations, or converted to float16: the panels' AMX tiles with split weights and activations,
no oneDNN, prompt attention on tiles in split halves), one engine per weight type; for each prompt
length the time to the first token (prefill plus one step) is taken with AMX switched on and off on every layer, alternating, best of each round;
then, for each --concurrent count, output tokens/s of that many requests (64-token prompts, 32
new tokens) the same way. Ratios are off / on (times) and on / off (throughput). Prefix caching
is off, so every run computes the whole prompt. Prints the machine. On a CPU without AMX tiles
the "on" side runs oneDNN's bf16 product without tiles (slower: the engine never chooses it
there) and the panels' path stays off. `--baseline sdpa-attention` makes the other side AMX
everywhere but prompt attention, which runs on SDPA per chunk (bfloat16 where oneDNN's products
pay off, else float32): the engine before prompt attention on tiles.
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

from starchat import LLM, SamplingParams  # noqa: E402
from starchat.bench.checkpoints import random_checkpoint  # noqa: E402
from starchat.bench.machine import describe_machine  # noqa: E402
from starchat.config import NAMED_SHAPES  # noqa: E402
from starchat.bench.offline import random_prompts  # noqa: E402
from starchat.model.cpu_decode import attach_fused_decode  # noqa: E402
from starchat.model.cpu_linear import (PackedLinear, amx_products_pay_off, native_amx_min_rows,  # noqa: E402
                                      native_amx_tiles, streams_its_weights)
from starchat.model import native  # noqa: E402
from starchat.model.attention import PromptAttention  # noqa: E402
from starchat.model.gpt_bigcode import Attention  # noqa: E402
from starchat.model.loader import choose_prompt_attention  # noqa: E402


def time_to_first_token(llm: LLM, prompt: list[int]) -> float:
    start = time.perf_counter()
    llm.generate([prompt], SamplingParams(max_new_tokens=1, ignore_eos=True))
    return time.perf_counter() - start


def output_tokens_per_s(llm: LLM, prompts: list[str], new_tokens: int = 32) -> float:
    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def switch_amx(llm: LLM, on: bool) -> None:
    """AMX on or off on every layer as the engine sets it up: oneDNN's products (bfloat16 and int8),
    the panels' tiles (also inside the fused decode step, whose layer table is rebuilt), prompt
    attention on tiles (else float32 SDPA) and decode attention on tiles (the library's tile state)."""
    model = llm.engine.runner.model
    streamed = streams_its_weights(model)
    if on:
        native.amx_init()
    else:
        native.amx_disable()
    for layer in model.modules():
        if isinstance(layer, PackedLinear):
            layer.amx_products = on and layer.packed_weight.dtype in (torch.bfloat16, torch.int8)
            layer.amx_min_rows = native_amx_min_rows(layer.packed_weight.dtype, streamed) if on else 0
    prompt_attention = choose_prompt_attention(model) if on else PromptAttention()
    for attention in model.modules():
        if isinstance(attention, Attention):
            attention.prompt_attention = prompt_attention
    attach_fused_decode(model)


def configure(llm: LLM, side: str, baseline: str) -> None:
    """"on": everything on AMX as the engine sets it up; "off": the baseline, either AMX off
    everywhere ("native") or only prompt attention back on SDPA per chunk ("sdpa-attention": the
    engine before native/prompt_attention.c)."""
    switch_amx(llm, side == "on" or baseline == "sdpa-attention")
    if side == "off" and baseline == "sdpa-attention":
        for attention in llm.engine.runner.model.modules():
            if isinstance(attention, Attention):
                attention.prompt_attention = PromptAttention(attention.prompt_attention.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny_starcoder", choices=sorted(NAMED_SHAPES))
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--concurrent", type=int, nargs="*", default=[8, 32, 128])
    parser.add_argument("--weights", nargs="+", default=["bfloat16", "int8", "float16"],
                        choices=["bfloat16", "int8", "float16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", choices=["native", "sdpa-attention"], default="native",
                        help="the other side: AMX off everywhere, or only prompt attention on SDPA per chunk")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    other = "native" if args.baseline == "native" else "SDPA prompt attention"
    path = random_checkpoint(args.shape, torch.bfloat16)
    machine = describe_machine("cpu")
    print(f"machine: {machine}; AMX products chosen by the engine here: {amx_products_pay_off()}, "
          f"from the panels: {native_amx_tiles()}")
    results = {"machine": machine, "shape": args.shape, "engine_chooses_amx": amx_products_pay_off(),
               "amx_from_panels": native_amx_tiles(), "baseline": args.baseline, "figures": {}}
    generator = torch.Generator().manual_seed(0)
    prompts = {n: torch.randint(100, 40000, (n,), generator=generator).tolist() for n in args.prompt_tokens}
    for name in args.weights:
        quantize = "int8" if name == "int8" else None
        llm = LLM(str(path), dtype="float16" if name == "float16" else "bfloat16", device="cpu", progress=False, quantize=quantize,
                  enable_prefix_caching=False, max_num_batched_tokens=max(args.prompt_tokens),
                  max_num_seqs=max(args.concurrent, default=64))
        for n, prompt in prompts.items():
            best = {"on": [], "off": []}
            for round_index in range(args.rounds):
                for side in (("on", "off") if round_index % 2 == 0 else ("off", "on")):
                    configure(llm, side, args.baseline)
                    time_to_first_token(llm, prompt)  # warm-up of this side
                    best[side].append(min(time_to_first_token(llm, prompt) for _ in range(2)))
            on, off = min(best["on"]), min(best["off"])
            ratios = sorted(b / a for a, b in zip(best["on"], best["off"]))
            results["figures"][f"{name}/{n}"] = {"ms_amx": 1e3 * on, f"ms_{args.baseline}": 1e3 * off,
                                                 "speedup": off / on, "round_speedups": ratios}
            print(f"{name}, {n}-token prompt: first token {1e3 * on:.0f} ms with AMX, {1e3 * off:.0f} ms "
                  f"{other} -> x{off / on:.2f} (rounds x{ratios[0]:.2f}-x{ratios[-1]:.2f}); "
                  f"{n / on:.0f} against {n / off:.0f} prompt tokens/s")
        for count in args.concurrent:
            requests = random_prompts(count, 64)
            rates = {"on": [], "off": []}
            for round_index in range(args.rounds):
                for side in (("on", "off") if round_index % 2 == 0 else ("off", "on")):
                    configure(llm, side, args.baseline)
                    output_tokens_per_s(llm, requests[:2], 4)  # warm-up of this side
                    rates[side].append(output_tokens_per_s(llm, requests))
            on, off = max(rates["on"]), max(rates["off"])
            ratios = sorted(a / b for a, b in zip(rates["on"], rates["off"]))
            results["figures"][f"{name}/{count}_requests"] = {"tokens_per_s_amx": on, f"tokens_per_s_{args.baseline}": off,
                                                             "speedup": on / off, "round_speedups": ratios}
            print(f"{name}, {count} requests (64-token prompts, 32 new): {on:.0f} output tokens/s with AMX, "
                  f"{off:.0f} {other} -> x{on / off:.2f} (rounds x{ratios[0]:.2f}-x{ratios[-1]:.2f})")
        del llm
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
