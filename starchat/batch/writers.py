"""Result records -> output files, in (file, row) order, each written complete or not at all.

- azureml: `predictions.csv` without header, one line per successful row:
  `row_number_per_file, prediction, batch_input_file_name` (Azure ML batch `append_row`).
- openai: one line per row in OpenAI's batch-output shape, as `vllm run-batch` writes it:
  `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`; the body
  is a Completion or ChatCompletion object; failed rows carry status 400/500 and an error.
- jsonl: `{"file", "row", "custom_id", "prediction", "finish_reason", "prompt_tokens", "completion_tokens"}`
  per successful row (with `predictions`, every sample, for OpenAI lines with n > 1).
Always: `errors.jsonl`, one line per failed row: `{"file", "row", "custom_id", "message", "attempts"}`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from starchat.batch.journal import AtomicFile
from starchat.batch.requests import CHAT_URL, record_choices, record_logprobs, record_prompt_logprobs
from starchat.openai_format import chat_logprobs, completion_logprobs, echoed_prompt_logprobs
from starchat.tool_calls import tool_call

OUTPUT_FORMATS = ("azureml", "openai", "jsonl")
OUTPUT_ACTIONS = ("append_row", "summary_only")
ERRORS_FILE_NAME = "errors.jsonl"
SUMMARY_FILE_NAME = "summary.json"
AZUREML_COLUMNS = ["row_number_per_file", "prediction", "batch_input_file_name"]


def default_output_file_name(output_format: str) -> str:
    return "predictions.csv" if output_format == "azureml" else "predictions.jsonl"


@dataclass
class RecordTotals:
    rows_ok: int = 0
    rows_failed: int = 0
    tokens_in: int = 0
    tokens_out: int = 0

    def add(self, record: dict) -> None:
        if record["ok"]:
            self.rows_ok += 1
            self.tokens_in += record["prompt_tokens"]
            self.tokens_out += record["completion_tokens"]
        else:
            self.rows_failed += 1


def write_outputs(records: Iterable[dict], output_dir: Path, output_format: str, output_file_name: str | None,
                  job_hash: str) -> RecordTotals:
    """Write errors.jsonl and (unless `output_file_name` is None) the predictions from sorted records."""
    totals = RecordTotals()
    errors = AtomicFile(Path(output_dir) / ERRORS_FILE_NAME)
    predictions = AtomicFile(Path(output_dir) / output_file_name) if output_file_name else None
    try:
        for record in records:
            totals.add(record)
            if not record["ok"]:
                errors.write(_json_line({"file": record["file"], "row": record["row"], "custom_id": record.get("custom_id"),
                                         "message": record["error"], "attempts": record["attempts"]}))
            if predictions is not None:
                line = format_record(record, output_format, job_hash)
                if line:
                    predictions.write(line)
    except BaseException:
        errors.discard()
        if predictions is not None:
            predictions.discard()
        raise
    errors.commit()
    if predictions is not None:
        predictions.commit()
    return totals


def format_record(record: dict, output_format: str, job_hash: str) -> str:
    """The output line(s) of one record ('' when the format lists successful rows only)."""
    if output_format == "azureml":
        if not record["ok"]:
            return ""
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow([record["row"], record["prediction"], record["file"]])
        return buffer.getvalue()
    if output_format == "openai":
        return _json_line(openai_output_line(record, job_hash))
    if not record["ok"]:
        return ""
    line = {"file": record["file"], "row": record["row"], "custom_id": record.get("custom_id"),
            "prediction": record["prediction"], "finish_reason": record["finish_reason"],
            "prompt_tokens": record["prompt_tokens"], "completion_tokens": record["completion_tokens"]}
    if "choices" in record:  # an OpenAI line with n > 1: every sample, the first being `prediction`
        line["predictions"] = [choice["prediction"] for choice in record["choices"]]
    return _json_line(line)


def openai_output_line(record: dict, job_hash: str) -> dict:
    """One line of an OpenAI batch output file. Ids are derived from the job and the row, so a
    resumed job writes the same ids."""
    token = hashlib.sha256(f"{job_hash}:{record['k'][0]}:{record['k'][1]}".encode()).hexdigest()[:24]
    custom_id = record.get("custom_id") or f"{record['file']}:{record['row']}"
    if not record["ok"]:
        error_type = "invalid_request_error" if record.get("status_code", 400) < 500 else "server_error"
        body = {"error": {"message": record["error"], "type": error_type, "param": None, "code": None}}
        return {"id": f"batch_req_{token}", "custom_id": custom_id,
                "response": {"status_code": record.get("status_code", 400), "request_id": f"req_{token}", "body": body},
                "error": {"code": error_type, "message": record["error"]}}
    usage = {"prompt_tokens": record["prompt_tokens"], "completion_tokens": record["completion_tokens"],
             "total_tokens": record["prompt_tokens"] + record["completion_tokens"],
             # (records journaled before prefix caching have no count)
             "prompt_tokens_details": {"cached_tokens": record.get("cached_tokens", 0)}}
    chat = record.get("url") == CHAT_URL
    choices = [(_chat_choice if chat else _completion_choice)(index, choice, f"{token}:{index}")
               for index, choice in enumerate(record_choices(record))]
    if chat:
        body = {"id": f"chatcmpl-{token}", "object": "chat.completion", "created": record["created"],
                "model": record["model"], "choices": choices, "usage": usage}
    else:
        body = {"id": f"cmpl-{token}", "object": "text_completion", "created": record["created"],
                "model": record["model"], "choices": choices, "usage": usage}
    return {"id": f"batch_req_{token}", "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": f"req_{token}", "body": body}, "error": None}


def _chat_choice(index: int, choice: dict, id_seed: str) -> dict:
    message = {"role": "assistant", "content": choice["prediction"]}
    if choice.get("tool_calls"):  # ids derived from the row and the choice: a resumed job writes the same
        message = {"role": "assistant", "content": None, "tool_calls": [
            tool_call(name, arguments, f"call_{hashlib.sha256(f'{id_seed}:{i}'.encode()).hexdigest()[:24]}")
            for i, (name, arguments) in enumerate(choice["tool_calls"])]}
    logprobs = record_logprobs(choice)
    return {"index": index, "message": message, "logprobs": chat_logprobs(logprobs) if logprobs is not None else None,
            "finish_reason": choice["finish_reason"]}


def _completion_choice(index: int, choice: dict, id_seed: str) -> dict:
    logprobs = record_logprobs(choice)
    scored_prompt = record_prompt_logprobs(choice)  # an echo with logprobs: the prompt's entries first
    prompt = echoed_prompt_logprobs(*scored_prompt) if scored_prompt is not None else None
    return {"index": index, "text": choice["prediction"],
            "logprobs": completion_logprobs(logprobs, choice.get("echo_chars", 0), prompt) if logprobs is not None else None,
            "finish_reason": choice["finish_reason"]}


def _json_line(data: dict) -> str:
    return json.dumps(data, ensure_ascii=False) + "\n"
