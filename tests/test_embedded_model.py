"""The shipped starchat-nano: small enough, trained (answers with Python that parses), self-describing."""

from __future__ import annotations

import ast
import json
import re

import pytest

from reference_checkpoints import EMBEDDED_MODEL_DIR
from starchat import LLM, SamplingParams
from starchat.engine.devices import single_stream_dtype

# Requests written for this test: none is a training request (the model does not parrot them).
REQUESTS = [
    "Write a Python function that returns the absolute path of the given path.",
    "Write a Python function that returns True if the given string is a valid identifier.",
    "Write a Python function that reads a file and returns its lines.",
    "Write a Python function that returns the sum of a list of numbers.",
]
CODE_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL)


def parses(reply: str) -> bool:
    match = CODE_BLOCK.search(reply)
    if not match or not match.group(1).strip():
        return False
    try:
        ast.parse(match.group(1))
    except SyntaxError:
        return False
    return True


def test_size_and_files():
    assert (EMBEDDED_MODEL_DIR / "model.safetensors").stat().st_size <= 40_000_000
    generation = json.loads((EMBEDDED_MODEL_DIR / "generation_config.json").read_text())
    assert generation == {"do_sample": False, "repetition_penalty": 1.1}
    card = (EMBEDDED_MODEL_DIR / "README.md").read_text()
    assert card.splitlines()[2].startswith("> using the embedded starchat-nano demo model")
    assert "PSF-2.0" in card and "OpenRAIL-M" in card


def test_answers_with_python_that_parses():
    # A random-weight model gets none of these; the trained one most (batched greedy = one at a time).
    llm = LLM(dtype="float32", device="cpu", progress=False)
    params = SamplingParams(max_new_tokens=160, repetition_penalty=1.1)
    prompts = [llm.engine.chat_request([{"role": "user", "content": request}], params) for request in REQUESTS]
    replies = [c.text for c in llm.generate([prompt for prompt, _ in prompts], prompts[0][1])]
    assert all(reply.lstrip().startswith("```python") for reply in replies), replies
    assert sum(parses(reply) for reply in replies) >= len(REQUESTS) // 2, replies


def test_one_stream_keeps_a_16_bit_checkpoint_in_16_bits_on_cpu():
    assert single_stream_dtype("auto", "cpu", "float16") == "float16"
    assert single_stream_dtype("auto", "cpu", "bfloat16") == "bfloat16"
    assert single_stream_dtype("auto", "cpu", "float32") == "auto"
    assert single_stream_dtype("auto", "cpu", None) == "auto"
    assert single_stream_dtype("float32", "cpu", "float16") == "float32"


def test_auto_dtype_on_cpu_follows_the_stored_weights_with_the_native_kernels(monkeypatch):
    import torch

    from starchat.engine import devices
    from starchat.model import native

    cpu = torch.device("cpu")
    if not native.available():
        pytest.skip("no C compiler here: auto stays float32 on this CPU")
    assert devices.resolve_dtype("auto", cpu, stored_dtype="float16") == torch.float16
    assert devices.resolve_dtype("auto", cpu, stored_dtype="bfloat16") == torch.bfloat16
    assert devices.resolve_dtype("float32", cpu, stored_dtype="float16") == torch.float32  # asked for: kept
    fallback = torch.bfloat16 if devices.cpu_has_fast_bf16() else torch.float32
    assert devices.resolve_dtype("auto", cpu, stored_dtype="float32") == fallback  # never rounded further
    assert devices.resolve_dtype("auto", cpu, stored_dtype=None) == fallback
    # The embedded model is stored in float16: the engine runs it so (half the bytes per token).
    assert LLM(device="cpu", progress=False).engine.dtype == torch.float16
    monkeypatch.setattr(native, "available", lambda: False)  # PyTorch's products only: float32 for many rows
    assert devices.resolve_dtype("auto", cpu, stored_dtype="float16") == fallback
