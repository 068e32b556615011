"""The `starchat` console script, run as a user would (a subprocess)."""

import json
import subprocess
import sys

import pytest

from starchat import LLM, SamplingParams


def starchat(*args, stdin: str | None = None, timeout: float = 180):
    return subprocess.run([sys.executable, "-m", "starchat.cli.main", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def test_generate_json_equals_python_api(tiny_model_dir):
    result = starchat("generate", "--model", str(tiny_model_dir), "--max-new-tokens", "12", "--dtype", "float32", "--json",
                      "def add(a, b):")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    expected = LLM(str(tiny_model_dir), dtype="float32", progress=False).generate(
        ["def add(a, b):"], SamplingParams(max_new_tokens=12))[0]
    assert printed == {"text": expected.text, "token_ids": expected.token_ids, "finish_reason": expected.finish_reason}


def test_generate_with_speculative_decoding_prints_the_same_text():
    # starchat-nano writes code that repeats itself, so drafts are found (and some rejected).
    args = ["generate", "--max-new-tokens", "48", "--dtype", "float32", "--json",
            "def add(a, b):\n    return a + b\n\n\ndef subtract(a, b):\n"]
    plain, speculative = starchat(*args), starchat(*args, "--num-speculative-tokens", "4")
    assert plain.returncode == speculative.returncode == 0, speculative.stderr
    assert json.loads(speculative.stdout) == json.loads(plain.stdout)
    assert starchat(*args, "--num-speculative-tokens", "-1").returncode != 0


def test_generate_structured_output(tmp_path):
    import re

    pattern = r"def [a-z_]{1,12}\(\):"
    result = starchat("generate", "--max-new-tokens", "24", "--json", "--regex", pattern, "# make a list\n")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(pattern, json.loads(result.stdout)["text"])
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    result = starchat("generate", "--max-new-tokens", "24", "--json-schema", str(tmp_path / "schema.json"), "Answer:")
    assert result.returncode == 0, result.stderr
    assert isinstance(json.loads(result.stdout)["ok"], bool)
    bad = starchat("generate", "--regex", "[a-", "x")
    assert bad.returncode == 1 and "does not compile" in bad.stderr and "Traceback" not in bad.stderr
    inline = starchat("generate", "--max-new-tokens", "24", "--json", "--json-schema", json.dumps(schema), "Answer:")
    assert inline.returncode == 0, inline.stderr
    assert isinstance(json.loads(json.loads(inline.stdout)["text"])["ok"], bool)
    missing = starchat("generate", "--json-schema", str(tmp_path / "nowhere.json"), "x")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith("error: --json-schema: ") and "no such file" in missing.stderr


def test_embedded_model_says_what_it_is_first():
    result = starchat("generate", "--max-new-tokens", "3", "hello")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[0].startswith("starchat: ")
    assert "embedded starchat-nano" in result.stderr.splitlines()[0]


@pytest.mark.parametrize("args, message", [
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "2"], "top_p"),
    (["--max-new-tokens", "100000"], "max_new_tokens"),
    (["--device", "tpu"], "device: 'tpu' is not supported"),
    (["--dtype", "float8"], "dtype"),
])
def test_bad_parameters_exit_non_zero_with_one_line(tiny_model_dir, args, message):
    result = starchat("generate", "--model", str(tiny_model_dir), *args, "x")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {message}")


def test_chat_streams_replies_and_handles_commands(tiny_model_dir):
    result = starchat("chat", "--model", str(tiny_model_dir), "--max-new-tokens", "4", "--temperature", "0",
                      stdin="hello\n/system Be terse.\n/reset\nsecond question\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(">>> ") >= 3
    assert "(conversation cleared)" in result.stderr and "system prompt: Be terse." in result.stderr


def test_chat_goes_on_past_the_context_and_after_a_message_too_long(tiny_model_dir):
    turns = [f"question {i}: " + "explain this code " * 20 for i in range(8)]
    stdin = "\n".join(turns[:6] + ["/nonsense", "x = 1 " * 400, "a short question"] + turns[6:]) + "\n"
    result = starchat("chat", "--model", str(tiny_model_dir), "--max-new-tokens", "40", "--temperature", "0",
                      stdin=stdin, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "left the conversation to fit the model's context of 512 tokens" in result.stderr
    assert "(unknown command /nonsense)" in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "do not fit the context of 512 tokens" in errors[0], result.stderr
    assert result.stdout.count(">>> ") == 12  # 11 lines, each answered by a new prompt, and the one EOF ends


def test_fit_context_keeps_the_newest_exchanges_that_leave_room_for_a_reply(tiny_model_dir):
    from starchat.cli.generate import _fit_context

    engine = LLM(str(tiny_model_dir), dtype="float32", progress=False).engine
    params = SamplingParams(max_new_tokens=64)
    history = []
    for i in range(12):
        history += [{"role": "user", "content": f"question {i} " + "why " * 15},
                    {"role": "assistant", "content": f"answer {i} " + "because " * 15}]
    history.append({"role": "user", "content": "last question"})
    original = list(history)
    prompt, _, dropped = _fit_context(engine, history, params, None)
    assert dropped > 0 and history == original[2 * dropped:]
    assert prompt == engine.chat_prompt(history)
    assert len(engine.tokenize_prompt(prompt)) + 64 <= engine.max_model_len
    one_more = engine.chat_prompt(original[2 * dropped - 2:])  # keeping one more exchange would not fit
    assert len(engine.tokenize_prompt(one_more)) + 64 > engine.max_model_len

    too_long = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "x = 1 " * 400}]
    _, _, dropped = _fit_context(engine, too_long, params, None)
    assert dropped == 0 and len(too_long) == 3  # nothing is given up for a message that cannot be answered


@pytest.mark.parametrize("args, message", [
    (["latency", "--shape", "nope"], "shape: 'nope' is not one of"),
    (["latency", "--prompt-len", "100000", "--new-tokens", "2"], "--prompt-len 100000 + --new-tokens 2 exceed"),
    (["throughput", "--device", "tpu"], "device: 'tpu'"),
])
def test_bench_refuses_bad_options_with_one_line(tiny_model_dir, args, message):
    model = [] if "--shape" in args else ["--model", str(tiny_model_dir)]
    result = starchat("bench", *args, *model)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
