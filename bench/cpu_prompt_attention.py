"""Prompt attention of one layer on a CPU with AMX: every prefill chunk of a step in one native call
on AMX tiles (native/prompt_attention.c) against PyTorch's SDPA per chunk, as the engine runs each.

    python bench/cpu_prompt_attention.py [--shape tiny_starcoder] [--tokens 128 512 1024 2048]
                                         [--chunks 8x64 4x64+448] [--repeats 5] [--json PATH]

Cases: one fresh prompt of each --tokens length, and for each --chunks entry N x L(+C) a step of N
chunks of L new tokens after C cached ones (read back through slots from a bfloat16 cache, as
chunked prefill and prefix caching leave them). Two comparisons, timed in turns, best of
--repeats: bfloat16 (the tiles rounding queries, keys, values and weights to bfloat16, as
bfloat16 and int8 models run it) against bfloat16 SDPA, and split halves (16 bits of each, float16
models) against float32 SDPA, which float16 models ran before. Causal attention, the shape's
heads, one KV head for multi-query shapes. Prints milliseconds, ratios, achieved TFLOP/s (the
causal half of the products) and the machine. Needs AMX tiles granted by the kernel.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from starchat.bench.machine import describe_machine  # noqa: E402
from starchat.config import NAMED_SHAPES  # noqa: E402
from starchat.model import native  # noqa: E402
from starchat.model.attention import AttentionMetadata, PrefillChunk, PromptAttention, paged_attention  # noqa: E402


def parse_chunks(text: str) -> tuple[int, int, int]:
    """'8x64' or '4x64+448' -> (chunks, new tokens each, cached tokens each)."""
    count, _, rest = text.partition("x")
    length, _, context = rest.partition("+")
    return int(count), int(length), int(context or 0)


def build_step(count: int, length: int, context: int, heads: int, kv_heads: int, head_dim: int,
               generator: torch.Generator) -> dict:
    """A step's projections, a bfloat16 cache holding every chunk's context and metadata."""
    kv_dim = kv_heads * head_dim
    rows = count * length
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=generator)
    query, key, value = qkv.split((heads * head_dim, kv_dim, kv_dim), dim=-1)
    slots_per_chunk = context + length
    cache = torch.randn(2, count * slots_per_chunk, kv_dim, generator=generator).to(torch.bfloat16)
    chunks, slot_mapping = [], []
    for index in range(count):
        slots = torch.arange(index * slots_per_chunk, (index + 1) * slots_per_chunk)
        chunks.append(PrefillChunk(index * length, length, context, slots if context else None))
        slot_mapping.append(slots[context:])
    metadata = AttentionMetadata(slot_mapping=torch.cat(slot_mapping), num_decode_tokens=0, prefill_chunks=chunks)
    flops = 4 * heads * head_dim * count * sum(context + i + 1 for i in range(length))  # QK^T and PV, causal
    return {"query": query, "key": key, "value": value, "cache": cache, "metadata": metadata, "flops": flops}


def time_once(step: dict, heads: int, kv_heads: int, scale: float, prompt: PromptAttention) -> float:
    start = time.perf_counter()
    paged_attention(step["query"], step["key"], step["value"], step["cache"], step["metadata"], heads, kv_heads,
                    scale, prompt)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny_starcoder", choices=sorted(NAMED_SHAPES))
    parser.add_argument("--tokens", type=int, nargs="*", default=[128, 512, 1024, 2048])
    parser.add_argument("--chunks", nargs="*", default=["8x64", "4x64+448"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not native.available() or not native.amx_init():
        sys.exit("no AMX tiles here (a CPU without AMX, no C compiler, or the kernel refused the tile state)")
    shape = NAMED_SHAPES[args.shape]
    heads = shape["n_head"]
    kv_heads = 1 if shape.get("multi_query", True) else heads
    head_dim = shape["n_embd"] // heads
    scale = 1 / math.sqrt(head_dim)
    machine = describe_machine("cpu")
    print(f"machine: {machine}; shape {args.shape} ({heads} heads of {head_dim}, {kv_heads} KV head(s)), "
          f"{torch.get_num_threads()} threads")
    sides = {
        "tiles_bf16": PromptAttention(torch.bfloat16, amx_tiles=True),
        "sdpa_bf16": PromptAttention(torch.bfloat16),
        "tiles_split": PromptAttention(None, amx_tiles=True, split=True),
        "sdpa_f32": PromptAttention(None),
    }
    cases = [(f"1x{tokens}", (1, tokens, 0)) for tokens in args.tokens]
    cases += [(text, parse_chunks(text)) for text in args.chunks]
    generator = torch.Generator().manual_seed(0)
    results = {"machine": machine, "shape": args.shape, "threads": torch.get_num_threads(), "figures": {}}
    for name, (count, length, context) in cases:
        step = build_step(count, length, context, heads, kv_heads, head_dim, generator)
        best = dict.fromkeys(sides, float("inf"))
        for repeat in range(args.repeats + 1):  # the first round warms every side up
            order = list(sides) if repeat % 2 == 0 else list(reversed(sides))
            for side in order:
                seconds = time_once(step, heads, kv_heads, scale, sides[side])
                if repeat:
                    best[side] = min(best[side], seconds)
        figure = {f"ms_{side}": 1e3 * seconds for side, seconds in best.items()}
        figure["bf16_speedup"] = best["sdpa_bf16"] / best["tiles_bf16"]
        figure["split_vs_f32_speedup"] = best["sdpa_f32"] / best["tiles_split"]
        figure["tiles_bf16_tflops"] = step["flops"] / best["tiles_bf16"] / 1e12
        results["figures"][name] = figure
        print(f"{name} (chunks x new tokens + cached): tiles bf16 {figure['ms_tiles_bf16']:.3f} ms against SDPA bf16 "
              f"{figure['ms_sdpa_bf16']:.3f} -> x{figure['bf16_speedup']:.2f} ({figure['tiles_bf16_tflops']:.2f} TFLOP/s); "
              f"tiles split {figure['ms_tiles_split']:.3f} ms against SDPA f32 {figure['ms_sdpa_f32']:.3f} -> "
              f"x{figure['split_vs_f32_speedup']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
