"""Engine start-up from folders in the CPU kernels' panels (`starchat quantize`'s int8 or `starchat
pack`'s 16-bit weights: used where they lie, a large model mapped from its files) against folders
read and packed at every start (an int8 rows folder, a float checkpoint).

    python bench/restart.py --model-dirs PANELS_FOLDER ROWS_FOLDER [--rounds 2] [--drop-caches] [--json FILE]

Each round starts every folder twice in a fresh process, one folder after the other: first with
the page cache dropped (`--drop-caches`, needs root: a start after a reboot, or after the files
left the cache), then again at once (a restart: whatever the page cache kept of the files).
Each start reports the seconds to a loaded engine (`LLM(...)`), to the first token of a first
8-token request (the start as a client sees it), batch-1 decoding after it (ms/token from
new_tokens + 1 tokens against 1), and the process's peak RSS with its file-backed and anonymous
shares at the end (a mapped model's weights are file-backed: the page cache's pages, shared).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from starchat.bench.machine import describe_machine

KV_CACHE_BYTES = 1 << 30


def measure_start(model_dir: Path, new_tokens: int) -> dict:
    """One start in this process (the child's job)."""
    start = time.perf_counter()
    from starchat.bench.offline import ours_latency
    from starchat.llm import LLM
    from starchat.sampling_params import SamplingParams

    llm = LLM(str(model_dir), device="cpu", progress=False, kv_cache_memory_bytes=KV_CACHE_BYTES)
    loaded = time.perf_counter() - start
    llm.generate([list(range(100, 108))], SamplingParams(max_new_tokens=1))
    first_token = time.perf_counter() - start
    latency = ours_latency(llm, new_tokens, 8, repeats=1)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"load_s": loaded, "first_token_s": first_token, "ms_per_token": latency.ms_per_token,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "rss_file_gib": int(status.get("RssFile", "0 kB").split()[0]) / 2**20,
            "rss_anon_gib": int(status.get("RssAnon", "0 kB").split()[0]) / 2**20}


def layout_of(model_dir: Path) -> str:
    quantization = json.loads((model_dir / "config.json").read_text()).get("quantization_config") or {}
    return quantization.get("weight_layout", "rows") if quantization else "float"


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("1\n")


def run_child(model_dir: Path, new_tokens: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", str(model_dir), "--new-tokens", str(new_tokens)],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{model_dir}: the measuring process failed: {done.stderr.strip().splitlines()[-3:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dirs", type=Path, nargs="+")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--drop-caches", action="store_true", help="drop the page cache before each first start (root)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_start(args.child, args.new_tokens)))
        return
    results: dict[str, list[dict]] = {str(folder): [] for folder in args.model_dirs}
    for round_index in range(args.rounds):
        for folder in args.model_dirs:
            for start in ("cold", "restart"):
                if start == "cold" and args.drop_caches:
                    drop_page_cache()
                measured = run_child(folder, args.new_tokens) | {"round": round_index, "start": start}
                results[str(folder)].append(measured)
                print(f"{folder.name} ({layout_of(folder)}) round {round_index} {start:8s}: loaded {measured['load_s']:6.1f} s, "
                      f"first token {measured['first_token_s']:6.1f} s, {measured['ms_per_token']:6.0f} ms/token, "
                      f"peak RSS {measured['peak_rss_gib']:.2f} GiB (file {measured['rss_file_gib']:.2f}, "
                      f"anonymous {measured['rss_anon_gib']:.2f})", flush=True)
    summary = {}
    for folder, runs in results.items():
        for start in ("cold", "restart"):
            chosen = [run for run in runs if run["start"] == start]
            summary[f"{Path(folder).name} ({layout_of(Path(folder))}), {start}"] = {
                key: statistics.median(run[key] for run in chosen)
                for key in ("load_s", "first_token_s", "ms_per_token", "peak_rss_gib", "rss_file_gib", "rss_anon_gib")}
    for name, figures in summary.items():
        print(name, {key: round(value, 2) for key, value in figures.items()})
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": describe_machine(), "caches_dropped": args.drop_caches,
                                               "runs": results, "medians": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
