"""The README.md of starchat-nano, written from the build's own records (corpus summary, logs, eval).

Used by tools/build_starchat_nano.py (`install`); every number comes from a file of the build.
"""

from __future__ import annotations

import json
from pathlib import Path


def _last_eval_loss(run_dir: Path) -> float | None:
    log = run_dir / "train_log.jsonl"
    if not log.is_file():
        return None
    losses = [json.loads(line)["eval_loss"] for line in log.read_text().splitlines() if '"eval_loss"' in line]
    return losses[-1] if losses else None


def _fast_share(evaluation: dict) -> str:
    """How many replies took under a second, overall and among those with parseable code."""
    results = [r for r in evaluation.get("results", []) if r.get("seconds") is not None]
    good = [r for r in results if r["parses"]]
    if not results:
        return "no per-reply timing"
    return (f"{sum(r['seconds'] < 1 for r in results)} of {len(results)} under 1 s; replies with parseable code: "
            f"{sum(r['seconds'] < 1 for r in good)} of {len(good)} under 1 s")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_model_card(work: Path, model_dir: Path) -> Path:
    corpus = _read_json(work / "corpus" / "summary.json")
    evaluation = _read_json(work / "eval.json")
    no_penalty = _read_json(work / "eval-no-penalty.json")  # optional: the same eval without the penalty
    cpu_timing = _read_json(work / "eval-cpu.json")  # optional: the eval re-run one reply at a time on a CPU
    config = _read_json(model_dir / "config.json")
    pretrain_args = _read_json(work / "pretrain" / "training_args.json")
    sft_args = _read_json(work / "sft" / "training_args.json")
    machine = (work / "machine.txt").read_text().strip() if (work / "machine.txt").is_file() else None
    commands = (work / "commands.sh").read_text().strip() if (work / "commands.sh").is_file() else "(not recorded)"
    size = (model_dir / "model.safetensors").stat().st_size
    from starchat.config import ModelConfig

    parameters = ModelConfig.from_dict(config).num_parameters()
    timed = cpu_timing if cpu_timing.get("seconds_per_reply", {}).get("mean") is not None else evaluation
    seconds = timed.get("seconds_per_reply", {})
    share = evaluation.get("share_parseable")
    settings = evaluation.get("settings", {})
    penalty = settings.get("repetition_penalty", 1.0)

    def number(value, digits=3):
        return "n/a" if value is None else f"{value:.{digits}f}"

    sources = (model_dir / "sources.tsv").read_text().splitlines()[1:] if (model_dir / "sources.tsv").is_file() else []
    source_lines = "\n".join(f"- `{line.split(chr(9))[0]}` ({line.split(chr(9))[1]}, {line.split(chr(9))[4]})" for line in sources)
    card = f"""# starchat-nano

> using the embedded starchat-nano demo model ({parameters / 1e6:.0f} M parameters, trained on Python's standard library; not StarChat-beta): pass --model for a real checkpoint

A demo model, **not StarChat-beta**: a {parameters / 1e6:.1f} M-parameter GPTBigCode (multi-query attention,
{config.get("n_layer")} layers, width {config.get("n_embd")}, {config.get("n_positions")} positions) with the
StarCoder + StarChat tokenizer ({config.get("vocab_size")} tokens), trained with this repository's own recipe
(`starchat train pretrain`, then `starchat train sft`) on CPython's standard library. It ships inside
the package so that a first `starchat chat` answers with Python, not random tokens. It knows only
stdlib-style Python, has no general knowledge, and often writes code that runs but does not do what
was asked. Use a real model (e.g. `HuggingFaceH4/starchat-beta`) for anything else.

| | |
|---|---|
| weights | `model.safetensors`, {config.get("dtype") or config.get("torch_dtype")}, {size / 1e6:.1f} MB |
| pre-training data | {corpus.get("files", "?") - corpus.get("held_out_files", 0) if corpus else "?"} `.py` files of CPython {corpus.get("python", "?")}'s standard library (test folders excluded), {corpus.get("bytes", 0) / 1e6:.1f} MB in all |
| fine-tuning data | {corpus.get("train_dialogues", "?")} dialogues built from documented functions and methods of the training files |
| held-out | {corpus.get("held_out_files", "?")} files (split by file, seed 42): never seen in either stage |
| held-out loss (stdlib code, nats/token) | {number(evaluation.get("held_out_loss"))} over {evaluation.get("held_out_tokens", "?")} tokens |
| pre-training eval loss (last) | {number(_last_eval_loss(work / "pretrain"))} |
| fine-tuning eval loss (held-out dialogues, assistant tokens) | {number(_last_eval_loss(work / "sft"))} |
| replies with a code block `ast.parse` accepts | {evaluation.get("parseable", "?")} of {evaluation.get("requests", "?")} held-out requests ({number(share * 100 if share is not None else None, 0)}%): greedy, repetition penalty {penalty} (this model's `generation_config.json`, what `starchat chat` uses), at most {settings.get("max_new_tokens", "?")} new tokens{f"; without the penalty {no_penalty.get('parseable')} of {no_penalty.get('requests')}" if no_penalty else ""}{f"; replayed on the CPU below {cpu_timing.get('parseable')} of {cpu_timing.get('requests')}" if cpu_timing else ""} |
| seconds per reply (`starchat chat`'s path, {timed.get("settings", {}).get("dtype", "float32")}, {"a 2-core CPU" if timed is cpu_timing else "the build machine"}) | mean {number(seconds.get("mean"), 2)}, median {number(seconds.get("median"), 2)}, max {number(seconds.get("max"), 2)}; {_fast_share(timed)} |
| trained on | {machine or sft_args.get("device", "?")}{", bf16 autocast" if sft_args.get("bf16") else ""} |
| tokenizer | StarCoder's vocabulary (BigCode OpenRAIL-M) + StarChat's 4 tokens, converted from llama.cpp's MIT-licensed GGUF: see `../VOCAB_LICENSE.md` |

## Data and licence

Every training file is CPython standard-library source under the Python Software Foundation
License Version 2 (PSF-2.0; some modules carry the additional notices listed in CPython's LICENSE
file). The dialogues are derived from the same files: the user turn is "Write a Python function
that <the docstring's first sentence>", the assistant turn is that function (or method, dedented),
verbatim, in a ```python fenced block. The 50 eval requests come from held-out top-level functions. `sources.tsv` lists every file with its split, size, SHA-256 and licence.

## How it was built (exact commands)

```
{commands}
python3 tools/build_starchat_nano.py install --work-dir {work}
```

Pre-training: {json.dumps({k: pretrain_args.get(k) for k in ("learning_rate", "global_batch_size", "num_epochs", "max_steps", "warmup_ratio", "max_seq_len", "total_steps")})}.
Fine-tuning: {json.dumps({k: sft_args.get(k) for k in ("learning_rate", "global_batch_size", "num_epochs", "max_steps", "warmup_ratio", "max_seq_len", "total_steps", "train_dialogues")})}.

## Limits

- A demo: small, trained on one library's code for minutes to hours; it does not follow
  instructions beyond "write a function that ...", and its functions are often wrong.
- English docstrings and Python only; no multi-turn skill beyond the format.
- Not safety-tuned; not evaluated for anything but the two numbers above.

<details><summary>All source files ({len(sources)})</summary>

{source_lines}

</details>
"""
    path = model_dir / "README.md"
    path.write_text(card, encoding="utf-8")
    return path
