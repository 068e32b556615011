"""Speculative decoding with n-gram drafts, on against off, in the same run.

    python bench/speculative.py [--model DIR] [--dtype auto] [--windows 20] [--prompt-tokens 256]
                                [--new-tokens 64] [--drafts 5] [--concurrent 1] [--sampling] [--structured]
                                [--json PATH]

Prompts: the first --prompt-tokens tokens of Python standard-library modules (every k-th in name
order), continued greedily for --new-tokens tokens, --concurrent at a time (--sampling: with the
playground's sampling instead: temperature 0.2, top-p 0.95, top-k 50, repetition penalty 1.2; --structured:
constrained to STRUCTURED_SCHEMA, a JSON list of the functions and names the code defines, the
output ending when the JSON does, so tokens are counted as generated). The model defaults to
the embedded starchat-nano: acceptance depends on what a model writes. One engine runs each
group of prompts twice in turns, with drafting on and off (the scheduler's
`num_speculative_tokens`): two engines loaded side by side differ by themselves (on this host the
first-loaded one decoded 10-15% slower, whatever its settings), which would bias the ratio. Prints output tokens/s of each, their ratio, the share of drafts accepted, tokens per
verified step, and how many continuations are identical (greedy in float32: all of them; 16-bit:
the verify step computes the same sums in another order, so a near-tie can flip; sampled: each
draw differs, so only the speed is compared).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from starchat.bench.machine import describe_machine  # noqa: E402
from starchat.bench.offline import run_requests  # noqa: E402
from starchat.bench.quality import stdlib_windows  # noqa: E402
from starchat.config import EngineConfig  # noqa: E402
from starchat.engine.engine import LLMEngine  # noqa: E402
from starchat.model.loader import EMBEDDED_MODEL_DIR  # noqa: E402
from starchat.sampling_params import GuidedDecoding, SamplingParams  # noqa: E402

# What --structured asks for: the code's definitions as a JSON list (repeated keys, names taken
# from the prompt: what structured extraction from code looks like).
STRUCTURED_SCHEMA = {"type": "array", "minItems": 6, "maxItems": 6, "items": {
    "type": "object", "required": ["kind", "name", "line"],
    "properties": {"kind": {"type": "string", "enum": ["function", "class", "constant", "import"]},
                   "name": {"type": "string", "maxLength": 24}, "line": {"type": "integer", "minimum": 1,
                                                                         "maximum": 999}}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(EMBEDDED_MODEL_DIR))
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--drafts", type=int, default=5)
    parser.add_argument("--concurrent", type=int, default=1)
    parser.add_argument("--sampling", action="store_true", help="the playground's sampling instead of greedy decoding")
    parser.add_argument("--repetition-penalty", type=float, help="instead of the playground's (with --sampling)")
    parser.add_argument("--structured", action="store_true", help="outputs constrained to a JSON schema")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    # Prefix caching off: both passes see the same prompts, and the second should not find them cached.
    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, device=args.device, enable_prefix_caching=False,
                                    num_speculative_tokens=args.drafts,
                                    speculative_max_running=max(4, args.concurrent)), progress=False)
    drafts = {"on": args.drafts, "off": 0}
    prompts, _ = stdlib_windows(engine.tokenizer, args.windows, args.prompt_tokens)
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    if args.sampling:
        from starchat.server.playground import GENERATION_DEFAULTS as playground

        params = params.copy(do_sample=True, temperature=playground["temperature"], top_p=playground["top_p"],
                             top_k=playground["top_k"], repetition_penalty=playground["repetition_penalty"])
    if args.repetition_penalty is not None:
        params = params.copy(repetition_penalty=args.repetition_penalty)
    if args.structured:
        params = params.copy(guided=GuidedDecoding("json_schema", json.dumps(STRUCTURED_SCHEMA)))
        request = engine.tokenizer.encode("\n\n# The definitions above, as JSON:\n")
        prompts = [prompt + request for prompt in prompts]
    run_requests(engine, prompts[:1], SamplingParams(max_new_tokens=8, ignore_eos=True))  # warm-up
    seconds = {"on": 0.0, "off": 0.0}
    outputs = {"on": [], "off": []}
    for index, start in enumerate(range(0, len(prompts), args.concurrent)):
        group = prompts[start:start + args.concurrent]
        for name in (("on", "off") if index % 2 == 0 else ("off", "on")):
            engine.scheduler.num_speculative_tokens = drafts[name]
            timings, tokens = run_requests(engine, group, params)
            seconds[name] += max(timing.total for timing in timings)
            outputs[name] += tokens
    stats = engine.stats()
    drafted, accepted = stats.spec_decode_draft_tokens, stats.spec_decode_accepted_tokens
    identical = sum(a == b for a, b in zip(outputs["on"], outputs["off"]))
    figures = {
        "output_tokens_per_s": {name: sum(map(len, outputs[name])) / seconds[name] for name in seconds},
        "speedup_on_over_off": seconds["off"] / seconds["on"],
        "draft_tokens": drafted, "accepted_tokens": accepted,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "identical_continuations": identical, "continuations": len(prompts),
    }
    machine = describe_machine(args.device)
    print(f"machine: {machine}")
    print(f"model: {args.model} ({engine.dtype}, {args.device}); {len(prompts)} stdlib prompts of "
          f"{args.prompt_tokens} tokens, {args.new_tokens} new tokens each, {args.concurrent} at a time, "
          f"up to {args.drafts} drafts, {'sampled as the playground does' if args.sampling else 'greedy'}"
          f"{', JSON-schema constrained' if args.structured else ''}")
    rate = figures["output_tokens_per_s"]
    print(f"output tokens/s: speculative {rate['on']:.1f}, plain {rate['off']:.1f} -> x{figures['speedup_on_over_off']:.2f}")
    print(f"drafts accepted: {accepted} of {drafted} ({100 * figures['acceptance_rate']:.0f}%); "
          f"identical continuations: {identical} of {len(prompts)}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                         "figures": figures}, indent=1))


if __name__ == "__main__":
    main()
