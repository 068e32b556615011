"""Where a batch-1 decode step's time goes on a CPU: the engine's stages timed in place.

    python bench/decode_profile.py [--model DIR | --shape tiny_starcoder] [--dtype float16] [--tokens 128]

Wraps the engine's stages with timers (on a CPU with the native kernels: the one native call of
a decode step and the Python around it; sampling; output processing), decodes `--tokens` tokens of one request three
times and prints milliseconds per token for the fastest run, beside a plain read of 512 MiB
(`tensor.sum()`, the memory-bandwidth floor of a step that reads every weight once) and the
weight bytes per token. Same process, same run.
"""

from __future__ import annotations

import argparse
import time

import torch

from starchat.bench.checkpoints import random_checkpoint
from starchat.bench.machine import describe_machine
from starchat.bench.offline import random_prompts, timed_methods, weight_bytes_read_per_token
from starchat.llm import LLM
from starchat.model.native.build import load
from starchat.sampling_params import SamplingParams


def read_bandwidth(size_mib: int = 512, repeats: int = 7) -> float:
    values = torch.empty(size_mib << 18).uniform_()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        values.sum()
        best = min(best, time.perf_counter() - start)
    return values.numel() * 4 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--shape", default="tiny_starcoder")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--quantize")
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    llm = LLM(args.model or str(random_checkpoint(args.shape)), dtype=args.dtype, device="cpu", quantize=args.quantize,
              progress=False, enable_prefix_caching=False)
    engine, runner = llm.engine, llm.engine.runner
    model = runner.model
    targets = {"whole step": (engine, "step"), "prepare (prefill steps)": (runner, "prepare"),
               "sampling": (runner.sampler, "launch"), "outputs, detokenizing": (engine, "_process_outputs")}
    if model.fused_decode is not None:  # decode steps: one native call (cpu_decode.py)
        targets["decode step (Python side)"] = (model.fused_decode, "step")
        targets["decode step (native)"] = (load(), "starchat_decode_step")
    else:
        targets["model forward"] = (model, "forward")
        targets["lm_head"] = (model, "compute_logits")
    prompt = random_prompts(1, 8)[0]
    params = SamplingParams(max_new_tokens=args.tokens + 1, ignore_eos=True)
    llm.generate([prompt], params)  # warm-up
    best = None
    with timed_methods(targets) as timings:
        for _ in range(3):
            timings.reset()
            start = time.perf_counter()
            llm.generate([prompt], params)
            total = time.perf_counter() - start
            if best is None or total < best[0]:
                best = (total, dict(timings.seconds))
    total, stages = best
    if "decode step (native)" in stages:  # the native call is inside the Python side's time
        stages["decode step (Python side)"] -= stages["decode step (native)"]
    steps = args.tokens + 1
    weight_bytes = weight_bytes_read_per_token(model)
    bandwidth = read_bandwidth()
    head = model.lm_head
    head_bytes = sum(t.numel() * t.element_size() for t in head.parameters())
    head_seconds = lm_head_seconds(head, model.config.n_embd)
    print(f"machine: {describe_machine('cpu')}")
    print(f"dtype {args.dtype} quantize {args.quantize}: {weight_bytes / 1e6:.1f} MB of weights per token; "
          f"plain read {bandwidth / 1e9:.1f} GB/s -> floor {1e3 * weight_bytes / bandwidth:.2f} ms/token")
    print(f"{'generate, per token':28s} {1e3 * total / steps:7.2f} ms")
    for label, value in stages.items():
        print(f"{label:28s} {1e3 * value / steps:7.2f} ms")
    print(f"{'step minus the above':28s} {1e3 * (stages['whole step'] - sum(v for k, v in stages.items() if k != 'whole step')) / steps:7.2f} ms")
    print(f"lm_head product alone, one row: {1e3 * head_seconds:.2f} ms ({head_bytes / 1e6:.1f} MB, "
          f"{head_bytes / head_seconds / 1e9:.1f} GB/s; best of 20, same process)")


def lm_head_seconds(head, width: int, repeats: int = 20) -> float:
    """The lm_head's product on one row, measured alone: its share of a fused step."""
    row = torch.randn(1, width)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            head(row)
            best = min(best, time.perf_counter() - start)
    return best


if __name__ == "__main__":
    main()
