"""Dialogue files of every supported format, and malformed records named by file and line."""

from __future__ import annotations

import json

import pytest

from starchat.train.data import DataFormatError, parse_guanaco, read_dialogues

USER_ASSISTANT = [{"role": "user", "content": "Sort a list?"}, {"role": "assistant", "content": "Use sorted(x)."}]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_openai_messages_jsonl(tmp_path):
    system = [{"role": "system", "content": "Be brief."}]
    file = write_lines(tmp_path / "chat.jsonl", [json.dumps({"messages": USER_ASSISTANT}), "",
                                                  json.dumps({"messages": system + USER_ASSISTANT * 2})])
    result = read_dialogues([file])
    assert [list(d.messages) for d in result.dialogues] == [USER_ASSISTANT, system + USER_ASSISTANT * 2]
    assert [d.source for d in result.dialogues] == [f"{file}:1", f"{file}:3"]  # blank line 2 is not a record
    assert result.skipped == 0


def test_guanaco_text_form():
    text = "### Human: Sort a list?### Assistant: Use sorted(x).### Human: Reverse?### Assistant: reversed(x)"
    assert parse_guanaco(text) == [
        {"role": "user", "content": "Sort a list?"}, {"role": "assistant", "content": "Use sorted(x)."},
        {"role": "user", "content": "Reverse?"}, {"role": "assistant", "content": "reversed(x)"},
    ]


def test_guanaco_jsonl_and_prompt_response_jsonl(tmp_path):
    file = write_lines(tmp_path / "mixed.jsonl", [
        json.dumps({"text": "### Human: Sort a list?### Assistant: Use sorted(x)."}),
        json.dumps({"prompt": "Sort a list?", "response": "Use sorted(x).", "system": "Be brief."}),
    ])
    dialogues = read_dialogues([file]).dialogues
    assert list(dialogues[0].messages) == USER_ASSISTANT
    assert list(dialogues[1].messages) == [{"role": "system", "content": "Be brief."}] + USER_ASSISTANT


def test_csv_prompt_response_with_multiline_cells_reports_the_starting_line(tmp_path):
    file = tmp_path / "pairs.csv"
    file.write_text('prompt,response\n"Sort a list?","Use sorted(x)."\n"Two\nlines","ok"\n"Empty?",""\n', encoding="utf-8")
    with pytest.raises(DataFormatError) as error:
        read_dialogues([file])
    assert error.value.location == f"{file}:5"  # the record after the two-line one starts on line 5
    assert "empty" in str(error.value)
    result = read_dialogues([file], on_bad_record="skip")
    assert [list(d.messages) for d in result.dialogues][0] == USER_ASSISTANT
    assert result.dialogues[1].messages[0]["content"] == "Two\nlines"
    assert result.skipped == 1 and result.errors[0].startswith(f"{file}:5")


def test_csv_with_named_columns_and_missing_column(tmp_path):
    file = tmp_path / "qa.csv"
    file.write_text("q,a\nSort a list?,Use sorted(x).\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="no prompt column"):
        read_dialogues([file])
    result = read_dialogues([file], prompt_column="q", response_column="a")
    assert list(result.dialogues[0].messages) == USER_ASSISTANT


def test_parquet_prompt_response_and_bad_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"instruction": ["Sort a list?", None], "output": ["Use sorted(x).", "orphan"]}), file)
    with pytest.raises(DataFormatError) as error:
        read_dialogues([file])
    assert error.value.location == f"{file}:row 2" and "instruction" in str(error.value)
    result = read_dialogues([file], on_bad_record="skip")
    assert list(result.dialogues[0].messages) == USER_ASSISTANT and result.skipped == 1


@pytest.mark.parametrize("line, reason", [
    ('{"messages": [{"role": "user", "content": "hi"}', "not valid JSON"),
    ('["a", "list"]', "expected a JSON object"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "role"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}', "content"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]}', "system"),
    ('{"text": "no markers at all"}', "### Human:"),
    ('{"text": "preamble ### Human: q ### Assistant: a"}', "before the first"),
    ('{"question_text": "q"}', "expected a 'messages' list"),
])
def test_malformed_jsonl_line_is_named_or_skipped(tmp_path, line, reason):
    good = json.dumps({"messages": USER_ASSISTANT})
    file = write_lines(tmp_path / "data.jsonl", [good, good, line, good])
    with pytest.raises(DataFormatError) as error:
        read_dialogues([file])
    assert str(error.value).startswith(f"{file}:3: ")
    assert reason in str(error.value) and "--on-bad-record skip" in str(error.value)
    result = read_dialogues([file], on_bad_record="skip")
    assert len(result.dialogues) == 3 and result.skipped == 1


def test_unknown_extension_and_missing_file(tmp_path):
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(DataFormatError, match="unknown data format"):
        read_dialogues([tmp_path / "data.txt"])
    with pytest.raises(DataFormatError, match="no such file"):
        read_dialogues([tmp_path / "absent.jsonl"])
    with pytest.raises(ValueError, match="on_bad_record"):
        read_dialogues([], on_bad_record="ignore")
