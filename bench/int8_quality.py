"""int8 weight-only quantization against the 16-bit model it comes from: perplexity, logit drift
and greedy agreement, on the embedded starchat-nano (trained: real next-token distributions) and
on a random-weight checkpoint of a named shape.

    python bench/int8_quality.py [--shape tiny_starcoder] [--windows 40] [--json PATH]

Texts: the first --window-tokens tokens of Python standard-library modules (code, the models'
domain), every k-th module in name order. Reference: the model in bfloat16; candidate: the same
checkpoint with --quantize int8 (bf16 activations), both on the CPU with the native kernels, as
`starchat serve --quantize int8` runs it. Greedy: each window's first --prompt-tokens tokens,
--new-tokens new ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from starchat import LLM  # noqa: E402
from starchat.bench.checkpoints import random_checkpoint  # noqa: E402
from starchat.bench.machine import describe_machine  # noqa: E402
from starchat.bench.quality import compare, stdlib_windows  # noqa: E402
from starchat.config import NAMED_SHAPES  # noqa: E402
from starchat.model.loader import EMBEDDED_MODEL_DIR  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="tiny_starcoder", choices=sorted(NAMED_SHAPES),
                        help="random-weight checkpoint measured after starchat-nano")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--window-tokens", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {"machine": describe_machine(), "settings": vars(args) | {"json": str(args.json)}, "models": {}}
    for name, model_dir in (("starchat-nano", EMBEDDED_MODEL_DIR), (f"{args.shape} (random)", random_checkpoint(args.shape))):
        reference = LLM(str(model_dir), dtype="bfloat16", device="cpu", progress=False)
        candidate = LLM(str(model_dir), dtype="bfloat16", device="cpu", quantize="int8", progress=False)
        windows, modules = stdlib_windows(reference.tokenizer, args.windows, args.window_tokens)
        report = compare(reference, candidate, windows, args.prompt_tokens, args.new_tokens).as_dict()
        results["models"][name] = report | {"modules": modules}
        print(f"{name}: perplexity bf16 {report['reference_perplexity']:.3f} int8 {report['candidate_perplexity']:.3f} "
              f"(x{report['perplexity_ratio']:.4f}), KL {report['mean_kl']:.2e} nats, logit drift mean "
              f"{report['mean_relative_drift']:.4f} max {report['max_relative_drift']:.4f} of the range, "
              f"top-1 agreement {report['top1_agreement']:.1%}; greedy {args.new_tokens} tokens identical on "
              f"{report['greedy_identical']:.0%} of {report['greedy_prompts']} prompts, first difference after "
              f"{report['greedy_common_prefix']:.1f} tokens on average", flush=True)
        del reference, candidate
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
