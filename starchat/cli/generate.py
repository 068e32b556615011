"""`starchat generate` (one completion) and `starchat chat` (an interactive terminal chat)."""

from __future__ import annotations

import json
import re
from typing import List, Optional

import typer

from starchat.cli.common import MODEL_HELP, one_line_errors, print_notice, stderr_is_terminal
from starchat.sampling_params import SamplingParams


def generate_command(
    prompt: str = typer.Argument(..., help="Prompt text (use '-' to read it from standard input)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    max_new_tokens: int = typer.Option(256, help="Most tokens to generate."),
    min_new_tokens: int = typer.Option(0, help="Fewest tokens to generate before a stop may end it."),
    temperature: float = typer.Option(0.0, help="0 = greedy; above 0 samples at this temperature."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass in (0, 1]."),
    top_k: int = typer.Option(0, help="Sample among the k most likely tokens (0 = all)."),
    repetition_penalty: float = typer.Option(1.0, help="Above 1 discourages repeating tokens."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling: the same seed gives the same text."),
    stop: List[str] = typer.Option([], "--stop", help="Stop string (repeatable); not included in the output."),
    json_schema: Optional[str] = typer.Option(
        None, help="Structured output: the text is a JSON value following this schema (a file, or the schema itself)."),
    regex: Optional[str] = typer.Option(None, help="Structured output: the whole text matches this regular expression."),
    as_json: bool = typer.Option(False, "--json", help='Print {"text", "token_ids", "finish_reason"} as JSON.'),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16. auto on a CPU: a 16-bit checkpoint's own dtype (one stream decodes faster), else float32."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    quantize: Optional[str] = typer.Option(None, help="int8: weight-only int8 (a quarter of float32's memory)."),
    num_speculative_tokens: int = typer.Option(
        0, min=0, help="Speculative decoding: up to this many drafted tokens verified per step (drafts: what "
                       "followed earlier occurrences of the last tokens). Greedy: the same text; sampling (without "
                       "--seed, which turns drafting off): text of the same distribution. Faster when the output "
                       "repeats its context. 0 = off."),
):
    """Complete PROMPT and print the generated text."""
    import sys

    from starchat.llm import LLM
    from starchat.model.loader import resolve_model_dir

    print_notice(model)
    if prompt == "-":
        prompt = sys.stdin.read()
    with one_line_errors():
        params = SamplingParams(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, temperature=temperature,
                                top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty, seed=seed,
                                do_sample=temperature > 0, stop=list(stop), guided=_guided(json_schema, regex))
        params.validate()
        dtype = _one_stream_dtype(dtype, device, resolve_model_dir(model), quantize)
        llm = LLM(model, dtype=dtype, device=device, quantize=quantize, progress=stderr_is_terminal(),
                  num_speculative_tokens=num_speculative_tokens)
        if as_json:
            completion = llm.generate([prompt], params)[0]
            typer.echo(json.dumps({"text": completion.text, "token_ids": completion.token_ids,
                                   "finish_reason": completion.finish_reason}))
            return
        for delta in llm.stream(prompt, params):
            typer.echo(delta.text, nl=False)
        typer.echo()


def _guided(json_schema: Optional[str], regex: Optional[str]):
    from pathlib import Path

    from starchat.sampling_params import GuidedDecoding, SamplingParamsError

    if json_schema is not None and regex is not None:
        raise SamplingParamsError("regex", "give --json-schema or --regex, not both")
    if regex is not None:
        return GuidedDecoding("regex", regex)
    if json_schema is None:
        return None
    if json_schema.lstrip().startswith(("{", "[")) or json_schema.strip() in ("true", "false"):
        return GuidedDecoding("json_schema", json_schema)  # the schema itself
    path = Path(json_schema).expanduser()
    if not path.is_file():
        raise SamplingParamsError("--json-schema", f"{json_schema}: no such file; pass a JSON schema file or the "
                                                   "schema itself ('{\"type\": \"object\", ...}')")
    return GuidedDecoding("json_schema", path.read_text())


_MODEL_DEFAULT = "Default: the model's generation_config.json"


def _one_stream_dtype(dtype: str, device: str, model_dir, quantize: Optional[str]) -> str:
    """`auto` for one stream: a 16-bit checkpoint stays 16-bit on a CPU (faster batch-1 decoding)."""
    if dtype != "auto" or quantize:
        return dtype
    from starchat.config import ModelConfig
    from starchat.engine.devices import single_stream_dtype

    stored = ModelConfig.from_file(model_dir / "config.json").torch_dtype
    return single_stream_dtype(dtype, device, stored)
CHAT_HELP = ("Commands: /reset clears the conversation, /system TEXT sets the system prompt, /help shows this, /exit "
             "quits. Ctrl-C stops a reply.")


def chat_command(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="System prompt, or a named one: default, no_system, coding."),
    max_new_tokens: int = typer.Option(512, help="Most tokens per reply."),
    temperature: Optional[float] = typer.Option(None, help=f"0 = greedy. {_MODEL_DEFAULT}, else 0.2 (StarChat's)."),
    top_p: Optional[float] = typer.Option(None, help=f"{_MODEL_DEFAULT}, else 0.95."),
    top_k: Optional[int] = typer.Option(None, help=f"{_MODEL_DEFAULT}, else 50."),
    repetition_penalty: Optional[float] = typer.Option(None, help=f"{_MODEL_DEFAULT}, else 1.2."),
    seed: Optional[int] = typer.Option(None),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16. auto on a CPU: a 16-bit checkpoint's own dtype, else float32."),
    device: str = typer.Option("auto"),
    quantize: Optional[str] = typer.Option(None, help="int8: weight-only int8."),
):
    """Chat in the terminal; replies stream as they are generated."""
    from starchat.generation_defaults import chat_sampling_defaults
    from starchat.llm import LLM
    from starchat.model.loader import resolve_model_dir

    print_notice(model)
    with one_line_errors():
        model_dir = resolve_model_dir(model)
        defaults = chat_sampling_defaults(model_dir)
        given = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "repetition_penalty": repetition_penalty}
        sampling = defaults | {name: value for name, value in given.items() if value is not None}
        params = SamplingParams(max_new_tokens=max_new_tokens, seed=seed, do_sample=sampling["temperature"] > 0, **sampling)
        params.validate()
        dtype = _one_stream_dtype(dtype, device, model_dir, quantize)
        llm = LLM(model, dtype=dtype, device=device, quantize=quantize, progress=stderr_is_terminal())
    typer.echo(CHAT_HELP, err=True)
    history: list[dict] = []
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            typer.echo()
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history.clear()
            typer.echo("(conversation cleared)", err=True)
            continue
        if text == "/help":
            typer.echo(CHAT_HELP, err=True)
            continue
        if text == "/system" or text.startswith("/system "):
            system = text[len("/system"):].strip() or None
            typer.echo(f"(system prompt: {system or 'none'})", err=True)
            continue
        if re.fullmatch(r"/\w+", text.split(maxsplit=1)[0]):  # "/help", "/nonsense"; a path like /usr/x goes through
            typer.echo(f"(unknown command {text.split()[0]}) {CHAT_HELP}", err=True)
            continue
        history.append({"role": "user", "content": line})
        prompt, chat_params, dropped = _fit_context(llm.engine, history, params, system)
        if dropped:
            typer.echo(f"(the oldest {dropped} exchange{'s' * (dropped > 1)} left the conversation to fit the "
                       f"model's context of {llm.engine.max_model_len} tokens)", err=True)
        reply = _stream_reply(llm, prompt, chat_params)
        if reply is None:
            history.pop()  # a message the model could not take stays out of the conversation
            continue
        history.append({"role": "assistant", "content": reply})


def _fit_context(engine, history: list[dict], params: SamplingParams,
                 system: str | None) -> tuple[str, SamplingParams, int]:
    """The chat prompt of `history` after dropping its oldest exchanges until the prompt leaves
    room for a reply (all of `max_new_tokens`, or half the context if that is less), so that a
    long chat goes on instead of failing at every turn. The newest message always stays."""
    needed = min(params.max_new_tokens, engine.max_model_len // 2)
    dropped = 0  # exchanges: a user message and its reply
    while True:
        prompt, chat_params = engine.chat_request(history[2 * dropped:], params, system)
        room = engine.max_model_len - len(engine.tokenize_prompt(prompt))
        if room >= needed:
            break
        if 2 * dropped + 1 >= len(history):  # the newest message alone
            if room < 1:  # it cannot be answered at all: the request is refused, the chat stays as it was
                return prompt, chat_params, 0
            break
        dropped += 1
    del history[:2 * dropped]
    return prompt, chat_params, dropped


def _stream_reply(llm, prompt: str, params: SamplingParams) -> str | None:
    """The reply as streamed to the terminal; None when the request was refused (said why)."""
    parts: list[str] = []
    stream = llm.stream(prompt, params)
    try:
        for delta in stream:
            text = delta.text if parts else delta.text.lstrip()  # the model writes a newline after <|assistant|>
            if text:
                parts.append(text)
                typer.echo(text, nl=False)
    except KeyboardInterrupt:
        stream.close()  # cancels the request; the conversation keeps what was said so far
        typer.echo(" [stopped]", nl=False)
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        return None
    typer.echo()
    return "".join(parts)
