"""Where a prompt's prefill time goes on a CPU: the model's modules timed in place.

    python bench/prefill_profile.py [--model DIR | --shape tiny_starcoder] [--dtype bfloat16]
                                    [--quantize int8] [--tokens 128 512 8000] [--rounds 3]

Wraps each block's stages with timers (the four products, attention with its cache write, the
residual adds with their layer norms, and the GELU where it is a pass of its own rather than in
c_fc's stores), then for each --tokens length runs a fresh random prompt to its first token
--rounds times (prefix caching cannot help: each round's prompt differs) and prints the fastest
round's total and each stage's share. The timers themselves add a little per call. Prints the
machine.
"""

from __future__ import annotations

import argparse
import collections
import random
import time

import torch

from starchat.bench.checkpoints import random_checkpoint
from starchat.bench.machine import describe_machine
from starchat.llm import LLM
from starchat.model import attention, gpt_bigcode
from starchat.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--shape", default="tiny_starcoder")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantize", choices=["int8"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    print(describe_machine())
    model_dir = args.model or str(random_checkpoint(args.shape, torch.bfloat16, seed=0))
    llm = LLM(model_dir, dtype=args.dtype, quantize=args.quantize, progress=False)
    totals: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()

    def timed(name, function):
        def wrapper(*inputs, **options):
            start = time.perf_counter()
            result = function(*inputs, **options)
            totals[name] += time.perf_counter() - start
            calls[name] += 1
            return result
        return wrapper

    # Module-level functions the model calls by name; products and the GELU per module.
    gpt_bigcode.add_and_norm = timed("add + layer norm", gpt_bigcode.add_and_norm)
    gpt_bigcode.paged_attention = timed("attention (with cache write)", gpt_bigcode.paged_attention)
    attention.write_kv_cache = timed("  of which cache write", attention.write_kv_cache)
    model = llm.engine.runner.model
    for block in model.transformer.h:
        for name, module in (("c_attn", block.attn.c_attn), ("attn.c_proj", block.attn.c_proj),
                             ("mlp.c_fc" + (" (+ GELU)" if block.mlp.fused_activation else ""), block.mlp.c_fc),
                             ("mlp.c_proj", block.mlp.c_proj)):
            module.forward = timed(name, module.forward)
        if not block.mlp.fused_activation:
            block.mlp.act = timed("GELU", block.mlp.act)
    model.compute_logits = timed("lm_head (last row)", model.compute_logits)

    generator = random.Random(0)
    sampling = SamplingParams(max_new_tokens=1, ignore_eos=True)
    llm.generate([[generator.randrange(100, 40000) for _ in range(64)]], sampling)  # warm-up
    for tokens in args.tokens:
        best = None
        for _ in range(args.rounds):
            totals.clear()
            calls.clear()
            prompt = [generator.randrange(100, 40000) for _ in range(tokens)]
            start = time.perf_counter()
            llm.generate([prompt], sampling)
            elapsed = time.perf_counter() - start
            if best is None or elapsed < best[0]:
                best = (elapsed, dict(totals), dict(calls))
        elapsed, stage_totals, stage_calls = best
        print(f"\n{tokens}-token prompt, {args.dtype}{' + ' + args.quantize if args.quantize else ''}: "
              f"first token {elapsed * 1e3:.1f} ms (fastest of {args.rounds})")
        for name, seconds in sorted(stage_totals.items(), key=lambda item: -item[1]):
            print(f"  {name:30s} {seconds * 1e3:9.1f} ms  {100 * seconds / elapsed:5.1f}%  {stage_calls[name]:5d} calls")
        print(f"  {'rest (embedding, engine, Python)':30s} "
              f"{(elapsed - sum(v for k, v in stage_totals.items() if not k.startswith(' '))) * 1e3:9.1f} ms")


if __name__ == "__main__":
    main()
