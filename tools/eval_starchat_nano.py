"""Evaluate a starchat-nano build: held-out loss on stdlib code, and code blocks that parse.

    python3 tools/eval_starchat_nano.py --model DIR --held-out WORK/corpus/held_out \
        --requests WORK/dialogues/eval_requests.jsonl --output WORK/eval.json

1. Held-out loss: mean next-token cross-entropy (nats) on the held-out files (never trained on,
   in pre-training or fine-tuning), concatenated and cut into rows as in pre-training.
2. Requests: each "Write a Python function that ..." request is sent through our engine's chat
   path (`LLM.chat`, greedy); a reply counts when it holds a closed ``` code block that
   `ast.parse` accepts. Seconds per reply are measured on the same path as `starchat chat`
   (which runs a 16-bit checkpoint in float16 on a CPU: pass `--dtype float16` to match it);
   `--batched` sends all requests as one batch instead (same greedy replies, no timing: for a GPU).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CODE_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL)


def first_code_block(reply: str) -> str | None:
    match = CODE_BLOCK.search(reply)
    return match.group(1) if match else None


def parses(code: str | None) -> bool:
    if code is None or not code.strip():
        return False
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def held_out_loss(model_dir: Path, held_out: Path, seq_len: int, max_rows: int | None) -> dict:
    import torch
    from transformers import GPTBigCodeForCausalLM

    from starchat.tokenizer import Tokenizer
    from starchat.train.collate import collate
    from starchat.train.objective import LossModel
    from starchat.train.pretrain import list_code_files, read_texts, rows_from_texts

    texts, _ = read_texts(list_code_files([held_out], (".py",)))
    rows = rows_from_texts(texts, Tokenizer.from_dir(model_dir).backend, seq_len)[:max_rows]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = LossModel(GPTBigCodeForCausalLM.from_pretrained(model_dir, dtype=torch.float32)).eval().to(device)
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), 8):
            batch = collate(rows[start:start + 8]).to(device)
            loss_sum += model(batch.input_ids, batch.labels, batch.position_ids,
                              batch.model_attention_mask("sdpa")).item()
            count += sum(row.num_loss_tokens for row in rows[start:start + 8])
    return {"held_out_loss": loss_sum / max(1, count), "held_out_tokens": count, "held_out_files": len(texts)}


def request_success(model_dir: Path, requests: list[dict], max_new_tokens: int, repetition_penalty: float,
                    batched: bool = False, cuda_graphs: bool = True, dtype: str = "float32") -> dict:
    from starchat import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype=dtype, progress=False, cuda_graphs=cuda_graphs)
    params = SamplingParams(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
    conversations = [[{"role": "user", "content": item["request"]}] for item in requests]
    results = []
    if batched:  # greedy replies do not depend on what else is batched (tested in test_engine_batching)
        requests_and_params = [llm.engine.chat_request(messages, params) for messages in conversations]
        chat_params = requests_and_params[0][1]  # the same for every conversation: params + the <|end|> stop
        completions = llm.generate([prompt for prompt, _ in requests_and_params], chat_params)
        replies = [completion.text.lstrip() for completion in completions]  # as LLM.chat
        timings = [None] * len(requests)
    else:
        llm.chat([{"role": "user", "content": "warm-up"}], params.copy(max_new_tokens=4))
        replies, timings = [], []
        for messages in conversations:
            started = time.perf_counter()
            replies.append(llm.chat(messages, params).text)
            timings.append(round(time.perf_counter() - started, 3))
    for item, reply, seconds in zip(requests, replies, timings):
        results.append({"request": item["request"], "source": item.get("source"), "reply": reply,
                        "parses": parses(first_code_block(reply)), "seconds": seconds})
    times = [seconds for seconds in timings if seconds is not None]
    passed = sum(r["parses"] for r in results)
    return {"requests": len(results), "parseable": passed, "share_parseable": passed / max(1, len(results)),
            "seconds_per_reply": {"mean": statistics.mean(times) if times else None,
                                  "median": statistics.median(times) if times else None,
                                  "max": max(times) if times else None},
            "settings": {"decoding": "greedy", "max_new_tokens": max_new_tokens, "repetition_penalty": repetition_penalty,
                         "dtype": str(llm.engine.dtype).removeprefix("torch."), "device": str(llm.engine.device)},
            "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--held-out", type=Path, required=True, help="folder of held-out .py files")
    parser.add_argument("--requests", type=Path, required=True, help="JSONL of {request, source}")
    parser.add_argument("--output", type=Path, required=True, help="JSON report")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-rows", type=int, default=None, help="cap on held-out rows (speed)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--batched", action="store_true", help="all requests in one batch (GPU); no per-reply timing")
    parser.add_argument("--dtype", default="float32", help="engine dtype for the replies (float32, float16, bfloat16, auto)")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", help="eager decode steps on a GPU")
    options = parser.parse_args()
    requests = [json.loads(line) for line in options.requests.read_text().splitlines() if line.strip()]
    report = held_out_loss(options.model, options.held_out, options.seq_len, options.max_rows)
    report.update(request_success(options.model, requests, options.max_new_tokens, options.repetition_penalty,
                                  options.batched, options.cuda_graphs, options.dtype))
    options.output.write_text(json.dumps(report, indent=2) + "\n")
    summary = {k: v for k, v in report.items() if k != "results"}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
