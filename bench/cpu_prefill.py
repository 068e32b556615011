"""Prefill on a CPU with AMX: oneDNN's bf16 tile products (cpu_linear.PackedLinear._amx_forward)
and bfloat16 prompt attention against the native kernel and float32 attention, on one engine,
in turns.

    python bench/cpu_prefill.py [--shape tiny_starcoder] [--prompt-tokens 128 512 1024] [--rounds 3]
                                [--json PATH]

A random checkpoint of the shape (bfloat16; and quantized to int8, bfloat16 activations), one
engine per weight type; for each prompt length the time to the first token (prefill plus one
step) is taken with the AMX products switched on and off on every layer, alternating, best of
each round; the ratio is off / on. Prefix caching is off, so every run computes the whole
prompt. Prints the machine. On a CPU without AMX tiles the "on" side runs oneDNN's bf16 product
without tiles (slower: the engine never chooses it there).
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
from starchat.model.cpu_linear import PackedLinear, amx_products_pay_off  # noqa: E402
from starchat.model.gpt_bigcode import Attention  # noqa: E402


def time_to_first_token(llm: LLM, prompt: list[int]) -> float:
    start = time.perf_counter()
    llm.generate([prompt], SamplingParams(max_new_tokens=1, ignore_eos=True))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny_starcoder", choices=sorted(NAMED_SHAPES))
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    path = random_checkpoint(args.shape, torch.bfloat16)
    machine = describe_machine("cpu")
    print(f"machine: {machine}; AMX products chosen by the engine here: {amx_products_pay_off()}")
    results = {"machine": machine, "shape": args.shape, "engine_chooses_amx": amx_products_pay_off(), "figures": {}}
    generator = torch.Generator().manual_seed(0)
    prompts = {n: torch.randint(100, 40000, (n,), generator=generator).tolist() for n in args.prompt_tokens}
    for quantize in (None, "int8"):
        name = quantize or "bfloat16"
        llm = LLM(str(path), dtype="bfloat16", device="cpu", progress=False, quantize=quantize,
                  enable_prefix_caching=False, max_num_batched_tokens=max(args.prompt_tokens))
        layers = [m for m in llm.engine.runner.model.modules() if isinstance(m, PackedLinear)]
        attentions = [m for m in llm.engine.runner.model.modules() if isinstance(m, Attention)]
        for n, prompt in prompts.items():
            best = {"on": [], "off": []}
            for round_index in range(args.rounds):
                for side in (("on", "off") if round_index % 2 == 0 else ("off", "on")):
                    for layer in layers:
                        layer.amx_products = side == "on" and layer.packed_weight.dtype in (torch.bfloat16, torch.int8)
                    for attention in attentions:  # and prompt chunks' attention in bfloat16 with them
                        attention.prefill_attention_dtype = torch.bfloat16 if side == "on" else None
                    time_to_first_token(llm, prompt)  # warm-up of this side
                    best[side].append(min(time_to_first_token(llm, prompt) for _ in range(2)))
            on, off = min(best["on"]), min(best["off"])
            ratios = sorted(b / a for a, b in zip(best["on"], best["off"]))
            results["figures"][f"{name}/{n}"] = {"ms_amx": 1e3 * on, "ms_native": 1e3 * off,
                                                 "speedup": off / on, "round_speedups": ratios}
            print(f"{name}, {n}-token prompt: first token {1e3 * on:.0f} ms with AMX products, {1e3 * off:.0f} ms "
                  f"native -> x{off / on:.2f} (rounds x{ratios[0]:.2f}-x{ratios[-1]:.2f}); "
                  f"{n / on:.0f} against {n / off:.0f} prompt tokens/s")
        del llm
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
