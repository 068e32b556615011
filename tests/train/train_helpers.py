"""Shared by the training tests: a small dialogue set and the options of a tiny, fast SFT run."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from reference_checkpoints import write_hf_checkpoint
from starchat.train.loop import TrainingArguments
from starchat.train.sft import SFTOptions
from starchat.train.special_tokens import STARCHAT_TOKENS

STEPS = 24


def write_dialogues(path: Path, count: int = 48) -> Path:
    """Short, regular dialogues: a 2-layer model learns their shape within a few dozen steps."""
    generator = torch.Generator().manual_seed(0)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(count):
            a, b = torch.randint(0, 10, (2,), generator=generator).tolist()
            messages = [{"role": "user", "content": f"Write a Python function that adds {a} and {b}."},
                        {"role": "assistant", "content": f"```python\ndef add():\n    return {a} + {b}\n```"}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def sft_options(base: Path, data: Path, output: Path, **overrides) -> SFTOptions:
    training = dict(output_dir=output, learning_rate=1e-2, global_batch_size=4, micro_batch_size=4, max_steps=STEPS,
                    eval_steps=8, save_steps=8, progress=False, device="cpu")
    training.update(overrides.pop("training", {}))
    options = dict(base=str(base), data=[data], training=TrainingArguments(**training), max_seq_len=80,
                   eval_fraction=0.1)
    options.update(overrides)
    return SFTOptions(**options)


def write_starcoder_base(path: Path, **overrides) -> Path:
    """A 49,152-token base whose tokenizer lacks StarChat's tokens (as StarCoderPlus)."""
    write_hf_checkpoint(path, seed=3, vocab_size=49152, **overrides)
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] not in STARCHAT_TOKENS]
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = json.loads((path / name).read_text())
        config.pop("additional_special_tokens", None)
        decoder = config.get("added_tokens_decoder", {})
        for token_id in [k for k, v in decoder.items() if v["content"] in STARCHAT_TOKENS]:
            del decoder[token_id]
        (path / name).write_text(json.dumps(config))
    return path
