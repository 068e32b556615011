"""Input files -> rows: Azure ML CSV, JSONL (input_string or chat messages), OpenAI batch JSONL, Parquet.

A problem with one row (missing column, empty row, bytes that are not UTF-8, a malformed JSON
line) never stops the file: the row comes out with `error` set and the runner records it.
A problem with a path (missing, unreadable, no input files) raises InputPathError before any work.
Rows are numbered from 0 within their file: data rows of a CSV (after the header), lines of a
JSONL file, rows of a Parquet file.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

SUFFIX_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
OPENAI_URLS = ("/v1/completions", "/v1/chat/completions")
INPUT_COLUMN = "input_string"


class InputPathError(ValueError):
    """An input path the job cannot read; raised before any work starts."""


@dataclass(frozen=True)
class InputFile:
    path: Path
    name: str  # batch_input_file_name: the path relative to the folder given, or the file's name
    format: str  # csv | jsonl | parquet


@dataclass
class InputRow:
    """One row as read. Exactly one of `request` and `error` is set.

    `request` is a plain dict (JSON- and pickle-friendly, it travels to Ray actors):
    {"type": "text", "prompt": str, "parameters": dict | None}
    {"type": "chat", "messages": list, "parameters": dict | None}
    {"type": "openai", "custom_id": str, "url": str, "body": dict}
    """

    file_index: int
    file_name: str
    row: int
    request: dict | None = None
    error: str | None = None
    custom_id: str | None = field(default=None)

    @property
    def key(self) -> tuple[int, int]:
        return (self.file_index, self.row)


# ---- finding the files --------------------------------------------------------------------------

def _natural_key(text: str) -> list:
    """'file_2.csv' before 'file_10.csv': digit runs compare as numbers."""
    return [(0, int(part), part) if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def discover_inputs(paths: list[str | Path], exclude: Path | None = None) -> list[InputFile]:
    """Input files in a stable order: the paths in the order given, each folder walked recursively
    and sorted by relative path (digits compared as numbers). Hidden files, files of other types
    inside folders, and anything under `exclude` (the output folder) are left out."""
    if not paths:
        raise InputPathError("no input given; pass one or more files or folders")
    exclude = Path(exclude).resolve() if exclude is not None else None
    found: list[InputFile] = []
    seen: set[Path] = set()
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise InputPathError(f"input path {str(given)!r} does not exist")
        if not os.access(path, os.R_OK):
            raise InputPathError(f"input path {str(given)!r} is not readable (permission denied)")
        if path.is_file():
            candidates = [(path, path.name)]
            if path.suffix.lower() not in SUFFIX_FORMATS:
                raise InputPathError(f"input file {str(given)!r} has an unsupported type; use "
                                     f"{', '.join(sorted(SUFFIX_FORMATS))} files")
        elif path.is_dir():
            if exclude is not None and (path.resolve() == exclude or exclude in path.resolve().parents):
                raise InputPathError(f"input folder {str(given)!r} is the output folder or inside it; "
                                     "pick an --output outside the inputs")
            candidates = _walk_folder(path, exclude)
            if not candidates:
                raise InputPathError(f"input folder {str(given)!r} holds no {', '.join(sorted(SUFFIX_FORMATS))} files")
        else:
            raise InputPathError(f"input path {str(given)!r} is neither a file nor a folder")
        for file_path, name in candidates:
            resolved = file_path.resolve()
            if resolved in seen:
                continue
            if not os.access(file_path, os.R_OK):
                raise InputPathError(f"input file {str(file_path)!r} is not readable (permission denied)")
            seen.add(resolved)
            found.append(InputFile(file_path, name, SUFFIX_FORMATS[file_path.suffix.lower()]))
    return found


def _walk_folder(folder: Path, exclude: Path | None) -> list[tuple[Path, str]]:
    files = []
    for root, dirs, names in os.walk(folder, onerror=_raise_walk_error):
        root_path = Path(root)
        dirs[:] = [d for d in dirs if not d.startswith(".")
                   and (exclude is None or (root_path / d).resolve() != exclude)]
        for name in names:
            if name.startswith(".") or Path(name).suffix.lower() not in SUFFIX_FORMATS:
                continue
            file_path = root_path / name
            files.append((file_path, file_path.relative_to(folder).as_posix()))
    return sorted(files, key=lambda item: _natural_key(item[1]))


def _raise_walk_error(error: OSError) -> None:
    raise InputPathError(f"input folder {error.filename!r} cannot be listed ({error.strerror})")


def is_openai_batch_file(input_file: InputFile) -> bool:
    """True when the file's first non-empty line is an OpenAI batch request."""
    if input_file.format != "jsonl":
        return False
    with open(input_file.path, "rb") as handle:
        for raw in handle:
            if raw.strip():
                try:
                    first = json.loads(raw)
                except ValueError:
                    return False
                return isinstance(first, dict) and "custom_id" in first and "body" in first
    return False


# ---- reading rows -------------------------------------------------------------------------------

def read_rows(input_file: InputFile, file_index: int) -> Iterator[InputRow]:
    readers = {"csv": _read_csv, "jsonl": _read_jsonl, "parquet": _read_parquet}
    return readers[input_file.format](input_file, file_index)


def _row(input_file: InputFile, file_index: int, row: int, request=None, error=None, custom_id=None) -> InputRow:
    return InputRow(file_index, input_file.name, row, request=request, error=error, custom_id=custom_id)


def _read_csv(input_file: InputFile, file_index: int) -> Iterator[InputRow]:
    # surrogateescape keeps going past bytes that are not UTF-8; such rows are reported one by one.
    with open(input_file.path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        records = _csv_records(csv.reader(handle))
        first = next(records, None)
        if first is None:
            return
        header = first[1]
        if isinstance(header, csv.Error):
            header, header_error = [], f"the header line cannot be parsed as CSV ({header})"
        else:
            if header and header[0].startswith("\ufeff"):  # byte-order mark
                header[0] = header[0][1:]
            header_error = _header_problem(header)
        columns = {name: index for index, name in enumerate(header)}
        for line, values in records:
            row = line - 1
            if isinstance(values, csv.Error):
                yield _row(input_file, file_index, row, error=f"the row cannot be parsed as CSV ({values})")
            elif header_error:
                yield _row(input_file, file_index, row, error=header_error)
            elif not values or all(value == "" for value in values):
                yield _row(input_file, file_index, row, error="the row is empty")
            elif len(values) != len(columns):
                yield _row(input_file, file_index, row,
                           error=f"the row has {len(values)} fields but the header has {len(columns)}")
            else:
                parameters = values[columns["parameters"]] if "parameters" in columns else None
                yield _row(input_file, file_index, row, *_azure_request(values[columns[INPUT_COLUMN]], parameters))


def _csv_records(reader) -> Iterator[tuple[int, list[str] | csv.Error]]:
    """(record number, fields or the parse error) for each CSV record; blank lines at the end of
    the file are not records (editors leave them), blank lines before other records are."""
    blank: list[int] = []
    number = -1
    while True:
        number += 1
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            values = error
        if values == []:
            blank.append(number)
            continue
        for blank_number in blank:
            yield blank_number, []
        blank.clear()
        yield number, values


def _header_problem(header: list[str]) -> str | None:
    if _has_bad_bytes("".join(header)):
        return "the header line is not valid UTF-8"
    if INPUT_COLUMN not in header:
        shown = ", ".join(repr(name) for name in header) or "none"
        return f"the file has no {INPUT_COLUMN!r} column (its columns: {shown})"
    return None


def _has_bad_bytes(text: str) -> bool:
    """True when `text` came from bytes that were not UTF-8 (decoded with surrogateescape)."""
    return any("\udc80" <= char <= "\udcff" for char in text)


def _azure_request(input_string, parameters) -> tuple[dict | None, str | None]:
    """(request, None) or (None, error) for one Azure-style row: a prompt or a JSON list of chat messages."""
    if isinstance(input_string, str) and _has_bad_bytes(input_string):
        return None, f"{INPUT_COLUMN} is not valid UTF-8"
    if isinstance(parameters, str):
        if _has_bad_bytes(parameters):
            return None, "parameters is not valid UTF-8"
        if parameters.strip() == "":
            parameters = None
        else:
            try:
                parameters = json.loads(parameters)
            except ValueError as error:
                return None, f"parameters is not valid JSON ({error})"
    if parameters is not None and not isinstance(parameters, dict):
        return None, "parameters must be a JSON object"
    if input_string is None or (isinstance(input_string, str) and input_string == ""):
        return None, f"{INPUT_COLUMN} is empty"
    messages = _chat_messages(input_string)
    if messages is not None:
        return {"type": "chat", "messages": messages, "parameters": parameters}, None
    if not isinstance(input_string, str):
        return None, f"{INPUT_COLUMN} must be a string (a prompt) or a list of chat messages"
    return {"type": "text", "prompt": input_string, "parameters": parameters}, None


def _chat_messages(value) -> list | None:
    """The message list when `value` is one (or a JSON string of one): [{"role": ..., "content": ...}, ...]."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return value
    return None


def _read_jsonl(input_file: InputFile, file_index: int) -> Iterator[InputRow]:
    with open(input_file.path, "rb") as handle:
        data = handle.read()
    lines = data.split(b"\n")
    while lines and lines[-1].strip() == b"":
        lines.pop()  # the newline that ends the last line, and blank lines after it
    for row, raw in enumerate(lines):
        try:
            text = raw.decode("utf-8").lstrip("\ufeff")
        except UnicodeDecodeError as error:
            yield _row(input_file, file_index, row, error=f"the line is not valid UTF-8 (byte {error.start})")
            continue
        if text.strip() == "":
            yield _row(input_file, file_index, row, error="the line is empty")
            continue
        try:
            item = json.loads(text)
        except ValueError as error:
            yield _row(input_file, file_index, row, error=f"the line is not valid JSON ({error})")
            continue
        if not isinstance(item, dict):
            yield _row(input_file, file_index, row, error="the line must be a JSON object")
        elif "custom_id" in item or "body" in item:
            request, error = _openai_request(item)
            yield _row(input_file, file_index, row, request, error, custom_id=_custom_id(item))
        elif "messages" in item:
            messages = item["messages"]
            if not isinstance(messages, list) or not messages:
                yield _row(input_file, file_index, row, error="messages must be a non-empty list of {role, content} objects")
            else:
                parameters = item.get("parameters")
                error = None if parameters is None or isinstance(parameters, dict) else "parameters must be a JSON object"
                yield _row(input_file, file_index, row,
                           None if error else {"type": "chat", "messages": messages, "parameters": parameters}, error)
        elif INPUT_COLUMN in item:
            yield _row(input_file, file_index, row, *_azure_request(item[INPUT_COLUMN], item.get("parameters")))
        else:
            yield _row(input_file, file_index, row,
                       error=f"the line has no {INPUT_COLUMN!r}, 'messages' or OpenAI batch 'custom_id'/'body'")


def _custom_id(item: dict) -> str | None:
    value = item.get("custom_id")
    return value if isinstance(value, str) else None


def _openai_request(item: dict) -> tuple[dict | None, str | None]:
    custom_id, method, url, body = item.get("custom_id"), item.get("method", "POST"), item.get("url"), item.get("body")
    if not isinstance(custom_id, str) or not custom_id:
        return None, "custom_id must be a non-empty string"
    if method != "POST":
        return None, f"method must be 'POST', got {method!r}"
    if url not in OPENAI_URLS:
        return None, f"url must be one of {', '.join(OPENAI_URLS)}, got {url!r}"
    if not isinstance(body, dict):
        return None, "body must be a JSON object"
    return {"type": "openai", "custom_id": custom_id, "url": url, "body": body}, None


def _read_parquet(input_file: InputFile, file_index: int) -> Iterator[InputRow]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(input_file.path)
    names = parquet.schema_arrow.names
    has_input, has_messages = INPUT_COLUMN in names, "messages" in names
    columns = [name for name in (INPUT_COLUMN, "messages", "parameters") if name in names]
    if not has_input and not has_messages:
        message = f"the file has no {INPUT_COLUMN!r} or 'messages' column (its columns: {', '.join(names) or 'none'})"
        for row in range(parquet.metadata.num_rows):
            yield _row(input_file, file_index, row, error=message)
        return
    row = 0
    for batch in parquet.iter_batches(batch_size=1024, columns=columns):
        for item in batch.to_pylist():
            parameters = item.get("parameters")
            if isinstance(parameters, dict):  # a struct column: absent keys come back as None
                parameters = {k: v for k, v in parameters.items() if v is not None}
            value = item.get(INPUT_COLUMN)
            if value is None and has_messages and item.get("messages") is not None:
                value = item["messages"]
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    yield _row(input_file, file_index, row, error=f"{INPUT_COLUMN} is not valid UTF-8")
                    row += 1
                    continue
            yield _row(input_file, file_index, row, *_azure_request(value, parameters))
            row += 1

