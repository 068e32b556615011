"""The CPU kernels of this checkout against those of another commit, in turns in one process.

    python bench/native_ab.py --baseline b97f660 [--rows 128 512] [--shape tiny_starcoder]
                              [--dtype bfloat16] [--prompts 128 512 2048] [--rounds 16]
                              [--decode-batch 32] [--context 128] [--long-contexts 0 2000]

Builds both versions of starchat/model/native (the baseline's sources taken with `git show`,
each build cached under its own key as usual) and loads both libraries. Then:
- products: each of the shape's four layer products (c_attn, attn.c_proj, c_fc, mlp.c_proj) at
  each --rows, the two libraries in turns, fastest of --rounds each, bits compared;
- prompts: one engine whose native calls switch library between runs, a fresh random prompt
  of each --prompts length to its first token, in turns (the order swapped every round);
  prints the fastest and median of each and the median of the rounds' ratios;
- decodes: --decode-batch sequences of --context-token prompts, one of them --long-contexts tokens
  long instead (0: none), prefilled, then 8 engine decode steps with each library in turns
  (the order swapped every round); milliseconds a step, fastest and median, and the median of
  the rounds' ratios.
Ratios are baseline / this checkout: above 1 means this checkout is faster. The machine's noise
moves both alike only when they run in turns, which is why nothing here compares separate runs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from starchat.bench.checkpoints import random_checkpoint
from starchat.bench.machine import describe_machine
from starchat.config import NAMED_SHAPES
from starchat.llm import LLM
from starchat.model import cpu_decode, native
from starchat.model.native import build
from starchat.model.quant import quantize_per_channel
from starchat.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parents[1]


def baseline_sources(revision: str, into: Path) -> Path:
    """The native kernel sources at `revision` (files this checkout has, taken from git) in `into`."""
    for path in build.SOURCES + build.HEADERS:
        relative = path.relative_to(REPO).as_posix()
        shown = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:{relative}"], capture_output=True)
        if shown.returncode:
            raise SystemExit(f"git show {revision}:{relative} failed: {shown.stderr.decode().strip()}")
        (into / path.name).write_bytes(shown.stdout)
    return into


def load_library(directory: Path | None):
    """The kernels built from `directory` (None: this checkout's), AMX granted where the CPU has it."""
    sources, headers = list(build.SOURCES), list(build.HEADERS)
    try:
        if directory is not None:
            build.SOURCES = [directory / path.name for path in sources]
            build.HEADERS = [directory / path.name for path in headers]
        library = build.load.__wrapped__()
    finally:
        build.SOURCES, build.HEADERS = sources, headers
    if library is None:
        raise SystemExit("no C compiler: the native kernels cannot be built here")
    library.starchat_amx_init()
    return library


def use(library) -> None:
    native.load = lambda: library
    cpu_decode.load = native.load  # the fused decode step calls its own import of load


def products(libraries, shape: dict, rows_list: list[int], dtype: torch.dtype, rounds: int) -> None:
    hidden, inner = shape["n_embd"], shape.get("n_inner") or 4 * shape["n_embd"]
    kv = 2 * (hidden // shape["n_head"])  # multi-query: one key and one value head
    layers = {"c_attn": (hidden + kv, hidden), "attn.c_proj": (hidden, hidden), "mlp.c_fc": (inner, hidden),
              "mlp.c_proj": (hidden, inner)}
    generator = torch.Generator().manual_seed(0)
    for rows in rows_list:
        totals = [0.0, 0.0]
        for name, (n, k) in layers.items():
            weight, scales = torch.randn(n, k, generator=generator) / 30, None
            if dtype == torch.int8:
                weight, scales = quantize_per_channel(weight)
            else:
                weight = weight.to(dtype)
            packed, bias, x = native.pack_weight(weight), torch.randn(n, generator=generator), torch.randn(rows, k, generator=generator)
            outputs, times = [torch.empty(rows, n), torch.empty(rows, n)], [[], []]
            for _ in range(rounds):
                for i, library in enumerate(libraries):
                    use(library)
                    start = time.perf_counter()
                    native.linear(x, packed, n, bias, scales, 8, out=outputs[i], gelu_tanh=name == "mlp.c_fc")
                    times[i].append(time.perf_counter() - start)
            best = [min(t) * 1e3 for t in times]
            totals = [totals[0] + best[0], totals[1] + best[1]]
            same = "same bits" if torch.equal(*outputs) else f"max difference {(outputs[0] - outputs[1]).abs().max().item():.2e}"
            print(f"  {rows:5d} rows {name:12s} {n:6d} x {k:6d}: baseline {best[0]:8.3f} ms  this {best[1]:8.3f} ms  "
                  f"x{best[0] / best[1]:.3f}  ({same})")
        print(f"  {rows:5d} rows, all four: baseline {totals[0]:.3f} ms  this {totals[1]:.3f} ms  x{totals[0] / totals[1]:.3f}")


def prompts(libraries, model_dir: str, dtype: str, lengths: list[int], rounds: int) -> None:
    use(libraries[1])
    llm = LLM(model_dir, dtype=dtype, progress=False)
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    rng = random.Random(0)
    for length in lengths:
        llm.generate([[rng.randrange(100, 40000) for _ in range(length)]], params)  # warm both paths' memory
        times, ratios = [[], []], []
        for round_number in range(rounds):
            prompt = [rng.randrange(100, 40000) for _ in range(length)]
            elapsed = [0.0, 0.0]
            for i in ((0, 1) if round_number % 2 else (1, 0)):
                use(libraries[i])
                prompt[0] = 100 + 2 * round_number + i  # no cached prefix shared with the other run
                start = time.perf_counter()
                llm.generate([prompt], params)
                elapsed[i] = time.perf_counter() - start
            times[0].append(elapsed[0]), times[1].append(elapsed[1])
            ratios.append(elapsed[0] / elapsed[1])
        print(f"  {length:5d}-token prompt, first token: baseline {min(times[0]) * 1e3:.1f} ms (median "
              f"{statistics.median(times[0]) * 1e3:.1f})  this {min(times[1]) * 1e3:.1f} ms (median "
              f"{statistics.median(times[1]) * 1e3:.1f})  median ratio x{statistics.median(ratios):.3f}")


def decodes(libraries, model_dir: str, dtype: str, batch: int, context: int, long_contexts: list[int], rounds: int) -> None:
    use(libraries[1])
    rng = random.Random(1)
    for long_context in long_contexts:
        lengths = [context] * batch
        if long_context:
            lengths[0] = long_context
        llm = LLM(model_dir, dtype=dtype, progress=False, max_num_seqs=max(batch, 8), enable_prefix_caching=False)
        engine, steps_per_turn = llm.engine, 8
        # Enough new tokens that no sequence ends before the timed steps do (the first prompts
        # start decoding while the later ones are prefilled); they are aborted after.
        new_tokens = 2 * rounds * steps_per_turn + 8 + sum(lengths) // 64
        ids = [engine.add_request([rng.randrange(100, 40000) for _ in range(length)],
                                  SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)) for length in lengths]
        scheduler = engine.scheduler
        while scheduler.waiting or not all(request.output_token_ids for request in scheduler.running):
            engine.step()  # until every prompt is prefilled: the steps timed below are decodes only
        times, ratios = [[], []], []
        for round_number in range(rounds):
            elapsed = [0.0, 0.0]
            for i in ((0, 1) if round_number % 2 else (1, 0)):
                use(libraries[i])
                start = time.perf_counter()
                for _ in range(steps_per_turn):
                    engine.step()
                elapsed[i] = (time.perf_counter() - start) / steps_per_turn
            times[0].append(elapsed[0]), times[1].append(elapsed[1])
            ratios.append(elapsed[0] / elapsed[1])
        for request_id in ids:
            engine.abort_request(request_id)
        while engine.has_unfinished_requests():
            engine.step()
        label = f"{batch} sequences of {context} tokens" + (f", one of {long_context} instead" if long_context else "")
        print(f"  {label}: baseline {min(times[0]) * 1e3:.2f} ms a step (median {statistics.median(times[0]) * 1e3:.2f})"
              f"  this {min(times[1]) * 1e3:.2f} (median {statistics.median(times[1]) * 1e3:.2f})"
              f"  median ratio x{statistics.median(ratios):.3f}")
        del llm, engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="a git revision of this repository")
    parser.add_argument("--shape", default="tiny_starcoder", choices=sorted(NAMED_SHAPES))
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "int8"])
    parser.add_argument("--rows", type=int, nargs="*", default=[128, 512])
    parser.add_argument("--prompts", type=int, nargs="*", default=[128, 512, 2048])
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--decode-batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=128, help="prompt tokens of each decoding sequence")
    parser.add_argument("--long-contexts", type=int, nargs="*", default=[0, 2000],
                        help="decode steps with one sequence this long among --context ones (0: all alike); none: skip")
    args = parser.parse_args()

    print(describe_machine())
    with tempfile.TemporaryDirectory() as scratch:
        libraries = [load_library(baseline_sources(args.baseline, Path(scratch))), load_library(None)]
        weight_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}[args.dtype]
        if args.rows:
            print(f"products, {args.shape} shapes, {args.dtype} weights, fastest of {args.rounds}:")
            products(libraries, NAMED_SHAPES[args.shape], args.rows, weight_dtype, args.rounds)
        if args.prompts:
            model_dtype = "bfloat16" if args.dtype == "int8" else args.dtype
            print(f"prompts, {args.shape} random weights, {model_dtype}, {args.rounds} rounds in turns:")
            if args.dtype == "int8":
                print("  (int8: the prompts run the model's own dtype; --dtype int8 affects the products only)")
            prompts(libraries, str(random_checkpoint(args.shape, torch.bfloat16, seed=0)), model_dtype, args.prompts, args.rounds)
        if args.long_contexts:
            model_dtype = "bfloat16" if args.dtype == "int8" else args.dtype
            print(f"decode steps, {args.shape} random weights, {model_dtype}, {args.rounds} rounds in turns:")
            decodes(libraries, str(random_checkpoint(args.shape, torch.bfloat16, seed=0)), model_dtype, args.decode_batch,
                    args.context, args.long_contexts, args.rounds)


if __name__ == "__main__":
    main()
