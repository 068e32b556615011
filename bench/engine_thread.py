"""Batch-1 decode from the thread that built the engine, from a second thread, and from a thread
that built its own engine (what AsyncLLM and Ray's batch actors do: starchat/engine/engine_thread.py).

    python bench/engine_thread.py [--model DIR | --shape tiny_starcoder] [--dtype bfloat16]
                                  [--new-tokens 128] [--rounds 2] [--json PATH]

On a CPU the native kernels' OpenMP threads belong to the thread that starts a parallel region
(libgomp keeps one team per such thread): an engine built in one thread and stepped in another
leaves two teams on the cores (so does a second engine in another thread, which is why each side
runs in a process of its own). Each side builds the engine, warms it up and generates
--new-tokens greedy tokens for a 128-token prompt; the sides take turns, --rounds times. Prints
ms per token (median over rounds, and each round), each side's rate against the building
thread's, and the machine. Random weights unless --model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from starchat.bench.checkpoints import random_checkpoint  # noqa: E402
from starchat.bench.machine import describe_machine  # noqa: E402
from starchat.bench.offline import random_prompts  # noqa: E402
from starchat.engine.engine_thread import start_engine_thread  # noqa: E402
from starchat.llm import LLM  # noqa: E402
from starchat.sampling_params import SamplingParams  # noqa: E402

SIDES = ("building thread", "second thread", "own thread")


def ms_per_token(llm: LLM, new_tokens: int, seed: int) -> float:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    llm.generate(random_prompts(1, 128, seed=seed + 1000), SamplingParams(max_new_tokens=8, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    llm.generate(random_prompts(1, 128, seed=seed), params)
    return 1e3 * (time.perf_counter() - start) / new_tokens


def in_thread(work):
    """work() in a new thread; its result."""
    result = []
    thread = threading.Thread(target=lambda: result.append(work()))
    thread.start()
    thread.join()
    return result[0]


def one_side(side: str, model: str, dtype: str, new_tokens: int, seed: int) -> float:
    def build() -> LLM:
        return LLM(model, dtype=dtype, device="cpu", progress=False)

    if side == "building thread":
        return ms_per_token(build(), new_tokens, seed)
    if side == "second thread":
        llm = build()
        return in_thread(lambda: ms_per_token(llm, new_tokens, seed))
    measured = []
    _, thread = start_engine_thread(build, lambda llm: measured.append(ms_per_token(llm, new_tokens, seed)), name="bench-engine")
    thread.join()
    return measured[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--shape", default="tiny_starcoder")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # one side, in this process
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    model = args.model or str(random_checkpoint(args.shape))
    if args.side:
        print(json.dumps(one_side(args.side, model, args.dtype, args.new_tokens, args.seed)))
        return
    machine = describe_machine("cpu")
    print(f"machine: {machine}\nmodel: {model} ({args.dtype}), batch-1 decode of {args.new_tokens} tokens, "
          f"each side in its own process")
    sides: dict[str, list[float]] = {side: [] for side in SIDES}
    for round_ in range(args.rounds):
        for side in SIDES:
            run = subprocess.run([sys.executable, __file__, "--model", model, "--dtype", args.dtype, "--new-tokens",
                                  str(args.new_tokens), "--side", side, "--seed", str(round_)],
                                 capture_output=True, text=True, check=True)
            sides[side].append(json.loads(run.stdout.strip().splitlines()[-1]))
    base = statistics.median(sides["building thread"])
    for side, values in sides.items():
        value = statistics.median(values)
        print(f"{side:16s} {value:6.2f} ms/token (rounds {', '.join(f'{v:.2f}' for v in values)}), "
              f"x{base / value:.2f} of the building thread's rate")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "model": model, "dtype": args.dtype,
                                         "new_tokens": args.new_tokens, "ms_per_token": sides}, indent=1))


if __name__ == "__main__":
    main()
