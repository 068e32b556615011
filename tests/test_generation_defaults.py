"""A checkpoint's generation_config.json sets `starchat chat`'s sampling defaults; flags still win."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from starchat import LLM, SamplingParams
from starchat.generation_defaults import STARCHAT_CHAT_DEFAULTS, chat_sampling_defaults


def starchat(*args, stdin: str):
    return subprocess.run([sys.executable, "-m", "starchat.cli.main", *args], input=stdin, capture_output=True,
                          text=True, timeout=180)


def test_defaults_without_a_generation_config(tmp_path):
    assert chat_sampling_defaults(tmp_path) == STARCHAT_CHAT_DEFAULTS


def test_generation_config_overrides_and_greedy(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "repetition_penalty": 1.1, "eos_token_id": 0}))
    assert chat_sampling_defaults(tmp_path) == {"temperature": 0.0, "top_p": 0.95, "top_k": 50, "repetition_penalty": 1.1}
    (tmp_path / "generation_config.json").write_text("{not json")
    assert chat_sampling_defaults(tmp_path) == STARCHAT_CHAT_DEFAULTS


def test_chat_uses_the_models_defaults(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "generation_config.json").write_text(json.dumps({"do_sample": False, "repetition_penalty": 5.0}))
    llm = LLM(str(model), dtype="float32", device="cpu", progress=False)
    question = [{"role": "user", "content": "hello"}]
    expected = llm.chat(question, SamplingParams(max_new_tokens=12, repetition_penalty=5.0)).text
    other = llm.chat(question, SamplingParams(max_new_tokens=12)).text
    assert expected != other  # the penalty changes this reply, so the check below can fail
    assert expected.strip()
    result = starchat("chat", "--model", str(model), "--max-new-tokens", "12", "--dtype", "float32", stdin="hello\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout
    flagged = starchat("chat", "--model", str(model), "--max-new-tokens", "12", "--dtype", "float32", "--repetition-penalty", "1.0",
                       stdin="hello\n/exit\n")
    assert other in flagged.stdout
