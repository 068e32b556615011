"""Prefix caching on against off, in the same run: a multi-turn chat and a burst of requests that
share a system prompt, seen before (warm) or not (cold) (scenarios: starchat/bench/prefix_cache.py).

    python bench/prefix_cache.py [--model DIR | --shape tiny_starcoder] [--dtype bfloat16] [--rounds 3]
                                 [--system-tokens 512] [--turns 6] [--user-tokens 48] [--reply-tokens 32]
                                 [--requests 16] [--json PATH]

One engine runs every scenario twice per round, with prefix caching on and off (the scheduler's
switch; the order alternates by round), each round with new random prompts (so that no round
finds the previous one's tokens cached; with caching off nothing is registered either). Two
engines loaded side by side differ by themselves (on this host the first-loaded one decoded
10-15% slower, whatever its settings), which would bias the ratios. A figure is the median over the rounds, a ratio the median of the rounds'
ratios (off / on: how many times faster with the cache).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from starchat.bench.checkpoints import random_checkpoint  # noqa: E402
from starchat.bench.machine import describe_machine  # noqa: E402
from starchat.bench.offline import random_prompts  # noqa: E402
from starchat.bench.prefix_cache import chat, shared_prefix  # noqa: E402
from starchat.config import EngineConfig  # noqa: E402
from starchat.engine.engine import LLMEngine  # noqa: E402


SCENARIOS = ("chat", "shared_prefix", "shared_prefix_cold")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--shape", default="tiny_starcoder")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--system-tokens", type=int, default=512)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--user-tokens", type=int, default=48)
    parser.add_argument("--reply-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    model = args.model or str(random_checkpoint(args.shape))
    engine = LLMEngine(EngineConfig(model=model, dtype=args.dtype, device=args.device), progress=False)
    shared_prefix(engine, random_prompts(1, 64, seed=99)[0], random_prompts(2, 8, seed=98), 4)  # warm-up
    sides = ("on", "off")

    rounds = []
    for round_index in range(args.rounds):
        seed = 1000 * (round_index + 1)
        system, cold_system = random_prompts(2, args.system_tokens, seed=seed)
        turns = random_prompts(args.turns, args.user_tokens, seed=seed + 1)
        questions = random_prompts(args.requests, args.user_tokens, seed=seed + 2)
        measured = {}
        for name in (sides if round_index % 2 == 0 else sides[::-1]):
            engine.scheduler.prefix_caching = name == "on"
            measured[name] = {
                "chat": chat(engine, system, turns, args.reply_tokens).summary(),
                "shared_prefix": shared_prefix(engine, system, questions, args.reply_tokens).summary(),
                "shared_prefix_cold": shared_prefix(engine, cold_system, questions, args.reply_tokens, warm=False).summary(),
            }
        rounds.append(measured)
        print(f"round {round_index + 1}: " + "; ".join(
            f"{scenario}: on {measured['on'][scenario]['wall_s']:.2f} s, off {measured['off'][scenario]['wall_s']:.2f} s"
            for scenario in SCENARIOS), flush=True)

    def median(name: str, scenario: str, key: str) -> float:
        return statistics.median(r[name][scenario][key] for r in rounds)

    def ratio(scenario: str, key: str) -> float:
        return statistics.median(r["off"][scenario][key] / r["on"][scenario][key] for r in rounds)

    summary = {}
    for scenario in SCENARIOS:
        summary[scenario] = {
            "mean_time_to_first_token_s": {name: median(name, scenario, "mean_time_to_first_token_s") for name in sides},
            "wall_s": {name: median(name, scenario, "wall_s") for name in sides},
            "prompt_tokens": rounds[0]["on"][scenario]["prompt_tokens"],
            "cached_tokens": {name: rounds[0][name][scenario]["cached_tokens"] for name in sides},
            "time_to_first_token_ratio_off_over_on": ratio(scenario, "mean_time_to_first_token_s"),
            "wall_ratio_off_over_on": ratio(scenario, "wall_s"),
        }
    machine = describe_machine(args.device)
    print(f"machine: {machine}")
    print(f"model: {model} ({args.dtype}, {args.device}); system prompt {args.system_tokens} tokens, "
          f"{args.user_tokens}-token user messages, {args.reply_tokens}-token replies")
    for scenario, figures in summary.items():
        detail = f"{args.turns} turns" if scenario == "chat" else f"{args.requests} requests at once"
        detail += ", system prompt not seen before" if scenario.endswith("cold") else ""
        print(f"{scenario} ({detail}, {figures['prompt_tokens']} prompt tokens, "
              f"{figures['cached_tokens']['on']} of them cached):")
        ttft, wall = figures["mean_time_to_first_token_s"], figures["wall_s"]
        print(f"  mean time to first token: on {1e3 * ttft['on']:.0f} ms, off {1e3 * ttft['off']:.0f} ms "
              f"-> x{figures['time_to_first_token_ratio_off_over_on']:.2f}")
        print(f"  whole scenario: on {wall['on']:.2f} s, off {wall['off']:.2f} s -> x{figures['wall_ratio_off_over_on']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                         "summary": summary, "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
