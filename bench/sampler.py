"""The sampler's cost per engine step against HF transformers' (its logits warpers, then
torch.multinomial), in the same run, on StarCoder's 49,156-token vocabulary.

    python bench/sampler.py [--rows 1 32 128] [--device cpu] [--repeats 5] [--json PATH]

Three parameter sets: temperature alone (the OpenAI API's default: temperature 1, top-p 1),
temperature 0.7 with top-p 0.9 (a common client setting), and StarChat's playground defaults
(temperature 0.2, top-k 50, top-p 0.95). Logits are drawn from a language model's typical
shape: a few dozen likely tokens over a long tail (random, seeded). Prints ms per step (best of
--repeats rounds) for both sides, their ratio, and the machine. Both sides draw a token per row
from the same filtered distribution (tests/test_sampling.py checks the distributions against
HF's warpers); HF's side is what `generate` does per step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from starchat.bench.machine import describe_machine  # noqa: E402
from starchat.engine.host_memory import keep_freed_host_memory  # noqa: E402
from starchat.engine.request import Request  # noqa: E402
from starchat.engine.sampler import Sampler  # noqa: E402
from starchat.sampling_params import SamplingParams  # noqa: E402

VOCAB = 49156
PARAMETER_SETS = {
    "temperature 1": dict(temperature=1.0),
    "temperature 0.7, top-p 0.9": dict(temperature=0.7, top_p=0.9),
    "playground: temperature 0.2, top-k 50, top-p 0.95": dict(temperature=0.2, top_k=50, top_p=0.95),
}


def language_model_logits(rows: int, device: torch.device) -> torch.Tensor:
    """A long tail around -5 and, per row, 40 likely tokens between 0 and 8 (random ids)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, VOCAB, generator=generator) * 2 - 5
    for row in logits:
        row[torch.randperm(VOCAB, generator=generator)[:40]] = torch.rand(40, generator=generator) * 8
    return logits.to(device)


def hf_step(logits: torch.Tensor, settings: dict) -> torch.Tensor:
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    warpers = LogitsProcessorList([TemperatureLogitsWarper(settings["temperature"])]
                                  + ([TopKLogitsWarper(settings["top_k"])] if settings.get("top_k") else [])
                                  + ([TopPLogitsWarper(settings["top_p"])] if settings.get("top_p", 1.0) < 1 else []))
    return torch.multinomial(torch.softmax(warpers(None, logits), dim=-1), 1)


def best_ms(step, device: torch.device, repeats: int, calls: int = 5) -> float:
    step()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(calls):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - started) / calls)
    return 1e3 * best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        keep_freed_host_memory()  # as the engine's CPU runner does: large temporaries are not faulted in anew each step
    results = {"machine": describe_machine(device), "threads": torch.get_num_threads(), "figures": []}
    print(json.dumps(results["machine"]))
    sampler = Sampler(eos_token_id=0)
    for rows in args.rows:
        logits = language_model_logits(rows, device)
        for name, settings in PARAMETER_SETS.items():
            params = SamplingParams(do_sample=True, **settings)
            requests = [Request(str(i), [1], params, frozenset(), 16, generator=torch.Generator(device).manual_seed(i))
                        for i in range(rows)]
            ours = best_ms(lambda: sampler(logits, requests), device, args.repeats)
            hf = best_ms(lambda: hf_step(logits, settings).tolist(), device, args.repeats)
            figure = {"rows": rows, "parameters": name, "starchat_ms": ours, "hf_ms": hf, "hf_over_starchat": hf / ours}
            results["figures"].append(figure)
            print(f"{rows:4d} rows  {name:52s} starchat {ours:8.2f} ms  HF {hf:8.2f} ms  x{hf / ours:.2f}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
