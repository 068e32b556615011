"""Batch endpoint throughput vs the offline engine, same prompts, same batch size, same process.

    python bench/batch.py                      # 1,000 short prompts, embedded model
    python bench/batch.py --rows 50 --model PATH --max-new-tokens 32 --batch-size 32

Both sides share one loaded engine, so model loading is not measured; every row generates
exactly --max-new-tokens tokens (min_new_tokens = max_new_tokens) so both do the same work.
The batch side is timed end to end: reading and hashing the CSV files, the journal (with its
fsyncs), and writing predictions.csv. The goal (issue 4): batch >= 90% of offline.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd


def make_prompts(count: int) -> list[str]:
    return [f"# Task {i}: return the sum of {i} and x\ndef add_{i}(x):" for i in range(count)]


def write_inputs(folder: Path, prompts: list[str], rows_per_file: int = 10) -> None:
    """CSV files as the Azure ML catalog's notebook writes them (index column, QUOTE_ALL)."""
    frame = pd.DataFrame({"input_string": prompts})
    for start in range(0, len(frame), rows_per_file):
        frame[start:start + rows_per_file].to_csv(folder / f"{start}.csv", quoting=csv.QUOTE_ALL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or Hub id (default: the embedded model)")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32, help="max_num_seqs of the engine, both sides")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    from starchat import LLM, SamplingParams
    from starchat.batch import run_batch

    llm = LLM(args.model, dtype=args.dtype, device=args.device, progress=False, max_num_seqs=args.batch_size)
    prompts = make_prompts(args.rows)
    n = args.max_new_tokens
    params = SamplingParams(max_new_tokens=n, min_new_tokens=n)
    llm.generate(prompts[: min(len(prompts), args.batch_size)], params)  # warm-up

    start = time.perf_counter()
    completions = llm.generate(prompts, params)
    offline_s = time.perf_counter() - start
    offline_tokens = sum(len(c.token_ids) for c in completions)

    work = Path(tempfile.mkdtemp(prefix="starchat-bench-batch-"))
    try:
        (work / "in").mkdir()
        write_inputs(work / "in", prompts)
        start = time.perf_counter()
        summary = run_batch(work / "in", work / "out", engine=llm.engine, progress="none",
                            parameters={"max_new_tokens": n, "min_new_tokens": n}, mini_batch_size=10)
        batch_s = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if summary.rows_ok != len(prompts):
        raise SystemExit(f"batch run failed: {summary}")

    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads {__import__('torch').get_num_threads()}, device {llm.engine.device}, dtype {llm.engine.dtype}")
    print(f"model: {llm.engine.model_name}; {len(prompts)} prompts, {n} new tokens each, batch size {args.batch_size}")
    rows = len(prompts)
    print(f"offline LLM.generate: {offline_s:.2f} s, {rows / offline_s:.1f} rows/s, "
          f"{offline_tokens / offline_s:.1f} output tok/s")
    print(f"batch run_batch     : {batch_s:.2f} s, {rows / batch_s:.1f} rows/s, {summary.tokens_out / batch_s:.1f} output tok/s "
          f"(generation alone {summary.generation_time_s:.2f} s)")
    print(f"batch / offline throughput: {offline_s / batch_s:.1%} (goal >= 90%)")


if __name__ == "__main__":
    main()
