"""Offline throughput: our engine vs HF transformers `generate` on the same random checkpoint.

    python bench/throughput.py --dtype float32 bfloat16 [--no-hf] [--json bench/results/throughput.json]

Figures, for each dtype, measured in the same run on the same machine:
  batch-1 decode tokens/s (short prompt, fixed number of new tokens), time to first token of a
  128-token prompt, and output tokens/s for N concurrent requests (128-token prompts, 128 new
  tokens; ours through the continuous-batching scheduler, HF as one static batch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, random_checkpoint, timed, write_json  # noqa: E402

from starchat import LLM, SamplingParams  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def random_prompts(count: int, length: int, vocab: int = 49152, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(19, vocab, (count, length), generator=generator).tolist()  # no special tokens


def bench_ours(model_dir: Path, dtype: str, args) -> dict:
    llm = LLM(str(model_dir), dtype=dtype, device=args.device, progress=False, max_num_seqs=max(64, args.concurrent),
              max_num_batched_tokens=args.max_batched_tokens)
    short = random_prompts(1, 8)[0]
    long = random_prompts(1, args.prompt_len, seed=1)[0]
    llm.generate([short], SamplingParams(max_new_tokens=8, ignore_eos=True))  # warm-up
    decode_time, _ = timed(lambda: llm.generate([short], SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)))
    ttft, _ = timed(lambda: llm.generate([long], SamplingParams(max_new_tokens=1, ignore_eos=True)))
    prompts = random_prompts(args.concurrent, args.prompt_len, seed=2)
    batch_time, _ = timed(lambda: llm.generate(prompts, SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)),
                          repeats=1)
    return {
        "batch1_tokens_per_s": args.new_tokens / decode_time,
        "batch1_ms_per_token": 1e3 * decode_time / args.new_tokens,
        "ttft_ms": 1e3 * ttft,
        f"concurrent{args.concurrent}_output_tokens_per_s": args.concurrent * args.new_tokens / batch_time,
    }


def bench_hf(model_dir: Path, dtype: str, args) -> dict:
    from transformers import GPTBigCodeForCausalLM

    model = GPTBigCodeForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype]).eval().to(args.device)

    def generate(prompts: list[list[int]], new_tokens: int):
        input_ids = torch.tensor(prompts, device=args.device)
        with torch.inference_mode():
            return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)

    short = random_prompts(1, 8)
    long = random_prompts(1, args.prompt_len, seed=1)
    generate(short, 8)
    decode_time, _ = timed(lambda: generate(short, args.new_tokens))
    ttft, _ = timed(lambda: generate(long, 1))
    batch_time, _ = timed(lambda: generate(random_prompts(args.concurrent, args.prompt_len, seed=2), args.new_tokens), repeats=1)
    return {
        "batch1_tokens_per_s": args.new_tokens / decode_time,
        "batch1_ms_per_token": 1e3 * decode_time / args.new_tokens,
        "ttft_ms": 1e3 * ttft,
        f"concurrent{args.concurrent}_output_tokens_per_s": args.concurrent * args.new_tokens / batch_time,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny_starcoder")
    parser.add_argument("--model", help="a real checkpoint folder instead of a random one")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--concurrent", type=int, default=32)
    parser.add_argument("--max-batched-tokens", type=int, default=512)
    parser.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    model_dir = Path(args.model) if args.model else random_checkpoint(args.shape)
    results = {"machine": machine(), "model": str(model_dir), "settings": vars(args), "runs": {}}
    print(f"machine: {results['machine']}")
    for dtype in args.dtype:
        run = {"ours": bench_ours(model_dir, dtype, args)}
        if not args.no_hf:
            run["hf"] = bench_hf(model_dir, dtype, args)
            run["ratio"] = {key: (run["ours"][key] / run["hf"][key] if "ms" not in key else run["hf"][key] / run["ours"][key])
                            for key in run["ours"]}
        results["runs"][dtype] = run
        print(f"\n== {dtype} ==")
        for key in run["ours"]:
            line = f"{key:38s} ours {run['ours'][key]:9.1f}"
            if "hf" in run:
                line += f"   hf {run['hf'][key]:9.1f}   ours/hf x{run['ratio'][key]:.2f}"
            print(line, flush=True)
    write_json(args.json, results)


if __name__ == "__main__":
    main()
