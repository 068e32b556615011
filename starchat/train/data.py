"""Dialogue files -> `Dialogue`s: JSONL (OpenAI `messages`, guanaco `text`, prompt/response), CSV, Parquet.

Formats, chosen by file extension and, for JSON lines, by the fields of each record:
- `.jsonl` / `.json` (one JSON object per line):
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   (OpenAI chat form)
    {"text": "### Human: ... ### Assistant: ..."}                                   (openassistant-guanaco)
    {"prompt": "...", "response": "..."}                                           (one exchange)
- `.csv` and `.parquet`: a prompt and a response column (names below, or given), an optional
  `system` column; or a `text` column in the guanaco form.

A malformed record raises `DataFormatError` naming the file and line (CSV: the line where the
record starts; Parquet: the row), or, with `on_bad_record="skip"`, is counted and left out.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from starchat.chat_template import ChatFormatError, validate_messages

PROMPT_COLUMNS = ("prompt", "instruction", "question", "input")
RESPONSE_COLUMNS = ("response", "completion", "output", "answer")
JSON_LINES_SUFFIXES = (".jsonl", ".json")
TABLE_SUFFIXES = (".csv", ".parquet")
ON_BAD_RECORD_CHOICES = ("stop", "skip")
# How many skipped-record messages a ReadResult keeps to show the user (the count is always exact).
MAX_KEPT_ERRORS = 10

_GUANACO_MARKER = re.compile(r"###\s*(Human|Assistant)\s*:")


class DataFormatError(ValueError):
    """A record (or a whole file) that cannot become a dialogue; the message starts with `file:line`."""

    def __init__(self, location: str, message: str):
        super().__init__(f"{location}: {message}")
        self.location = location
        self.message = message


class _BadRecord(ValueError):
    """Raised by the record parsers; the reader adds the file and line."""


@dataclass(frozen=True)
class Dialogue:
    """One conversation: validated messages (system first if any) and where it came from."""

    messages: tuple[dict, ...]
    source: str  # "file:line", for error messages and for splitting held-out data by file


@dataclass
class ReadResult:
    dialogues: list[Dialogue]
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # the first MAX_KEPT_ERRORS skip reasons


def read_dialogues(paths: Iterable[str | Path], on_bad_record: str = "stop",
                   prompt_column: str | None = None, response_column: str | None = None) -> ReadResult:
    """Read every file in order; with on_bad_record="skip", malformed records are counted, not fatal."""
    if on_bad_record not in ON_BAD_RECORD_CHOICES:
        raise ValueError(f"on_bad_record must be one of {', '.join(ON_BAD_RECORD_CHOICES)}, got {on_bad_record!r}")
    result = ReadResult(dialogues=[])
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise DataFormatError(str(path), "no such file")
        for location, record in _records(path, prompt_column, response_column):
            try:
                messages = record() if callable(record) else record
                result.dialogues.append(Dialogue(tuple(_check_dialogue(messages)), location))
            except (_BadRecord, ChatFormatError) as error:
                if on_bad_record == "stop":
                    raise DataFormatError(location, f"{error} (pass --on-bad-record skip to leave such records out)") from None
                result.skipped += 1
                if len(result.errors) < MAX_KEPT_ERRORS:
                    result.errors.append(f"{location}: {error}")
    return result


def _records(path: Path, prompt_column: str | None, response_column: str | None) -> Iterator[tuple[str, object]]:
    """(location, messages or a callable that parses them) for each record of one file."""
    suffix = path.suffix.lower()
    if suffix in JSON_LINES_SUFFIXES:
        yield from _json_lines_records(path, prompt_column, response_column)
    elif suffix == ".csv":
        yield from _csv_records(path, prompt_column, response_column)
    elif suffix == ".parquet":
        yield from _parquet_records(path, prompt_column, response_column)
    else:
        raise DataFormatError(str(path), f"unknown data format {suffix!r}; use .jsonl (or .json lines), .csv or .parquet")


def _json_lines_records(path: Path, prompt_column, response_column):
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            yield f"{path}:{line_number}", lambda line=line: _messages_from_json(line, prompt_column, response_column)


def _messages_from_json(line: str, prompt_column, response_column) -> list[dict]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise _BadRecord(f"not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise _BadRecord(f"expected a JSON object, got {type(record).__name__}")
    return _messages_from_mapping(record, prompt_column, response_column)


def _messages_from_mapping(record: dict, prompt_column, response_column) -> list[dict]:
    if "messages" in record:
        messages = record["messages"]
        if isinstance(messages, str):  # a CSV cell holding the JSON list
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError as error:
                raise _BadRecord(f"'messages' is not a valid JSON list ({error.msg})") from None
        return messages
    prompt_key = _pick_column(record.keys(), prompt_column, PROMPT_COLUMNS)
    response_key = _pick_column(record.keys(), response_column, RESPONSE_COLUMNS)
    if prompt_key and response_key:
        messages = []
        system = record.get("system")
        if _present(system):
            messages.append({"role": "system", "content": _text_field(record, "system")})
        messages.append({"role": "user", "content": _text_field(record, prompt_key)})
        messages.append({"role": "assistant", "content": _text_field(record, response_key)})
        return messages
    if "text" in record:
        return parse_guanaco(_text_field(record, "text"))
    raise _BadRecord(
        "expected a 'messages' list (OpenAI form), a 'text' field ('### Human: ... ### Assistant: ...'), "
        f"or prompt and response fields; found fields {sorted(record)}"
    )


def _csv_records(path: Path, prompt_column, response_column):
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        _check_table_columns(path, columns, prompt_column, response_column)
        line_number = reader.line_num + 1  # the line where the next record starts
        for row in reader:
            yield f"{path}:{line_number}", lambda row=row: _messages_from_mapping(
                {k: v for k, v in row.items() if k is not None}, prompt_column, response_column)
            line_number = reader.line_num + 1


def _parquet_records(path: Path, prompt_column, response_column):
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(str(path))
    except Exception as error:  # pyarrow raises several types for unreadable files
        raise DataFormatError(str(path), f"not a readable Parquet file ({error})") from None
    _check_table_columns(path, parquet.schema_arrow.names, prompt_column, response_column)
    row_number = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            row_number += 1
            yield f"{path}:row {row_number}", lambda row=row: _messages_from_mapping(row, prompt_column, response_column)


def _check_table_columns(path: Path, columns, prompt_column, response_column) -> None:
    """A table without usable columns is a file-level error: no record could be read."""
    columns = list(columns)
    if "messages" in columns or "text" in columns:
        return
    prompt_key = _pick_column(columns, prompt_column, PROMPT_COLUMNS)
    response_key = _pick_column(columns, response_column, RESPONSE_COLUMNS)
    if not prompt_key or not response_key:
        wanted = "prompt" if not prompt_key else "response"
        given = prompt_column if wanted == "prompt" else response_column
        names = given or " / ".join(PROMPT_COLUMNS if wanted == "prompt" else RESPONSE_COLUMNS)
        raise DataFormatError(
            str(path), f"no {wanted} column ({names}); columns are {columns}; name it with --{wanted}-column"
        )


def _pick_column(keys, chosen: str | None, candidates: tuple[str, ...]) -> str | None:
    keys = list(keys)
    if chosen is not None:
        return chosen if chosen in keys else None
    return next((name for name in candidates if name in keys), None)


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and value != ""


def _text_field(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        shown = "missing" if value is None or (isinstance(value, float) and math.isnan(value)) else type(value).__name__
        raise _BadRecord(f"field {key!r} must be text, got {shown}")
    return value


def parse_guanaco(text: str) -> list[dict]:
    """'### Human: q ### Assistant: a ### Human: ...' -> messages (openassistant-guanaco's form)."""
    parts = _GUANACO_MARKER.split(text)
    # parts = [before, role, content, role, content, ...]
    if len(parts) < 3:
        raise _BadRecord("text has no '### Human:' / '### Assistant:' turns")
    if parts[0].strip():
        raise _BadRecord(f"text before the first '### Human:' marker: {parts[0].strip()[:40]!r}")
    messages = []
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    return messages


def _check_dialogue(messages) -> list[dict]:
    """The chat template's validation, plus what training needs: an assistant turn to learn from."""
    if not isinstance(messages, list):
        raise _BadRecord(f"'messages' must be a list of {{role, content}} objects, got {type(messages).__name__}")
    checked = validate_messages(messages)
    if not any(message["role"] == "assistant" for message in checked):
        raise _BadRecord("no assistant message: nothing to learn from this dialogue")
    for index, message in enumerate(checked):
        if message["role"] != "system" and not message["content"].strip():
            raise _BadRecord(f"messages[{index}] ({message['role']}) is empty")
    return checked
