"""Inputs and outputs: Azure ML notebook CSVs, JSONL (text and chat), Parquet; azureml and jsonl outputs."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from batch_helpers import (engine, greedy, one_torch_thread, prompts, read_jsonl, read_predictions,  # noqa: F401
                           reference, write_jsonl, write_notebook_csvs)
from starchat.batch import run_batch
from starchat.batch.readers import discover_inputs, read_rows


def test_notebook_csv_folder_gives_predictions_equal_to_llm_generate(tmp_path, engine, reference):
    rows = prompts(25)
    write_notebook_csvs(tmp_path / "in", rows)  # 0.csv, 10.csv, 20.csv: index column, QUOTE_ALL
    assert (tmp_path / "in" / "0.csv").read_text().startswith('"","input_string"\n"0","# task 0: add 0, then ""0""\n')

    summary = run_batch(tmp_path / "in", tmp_path / "out", engine=engine, parameters={"max_new_tokens": 6},
                        progress="none")

    assert summary.status == "completed" and summary.rows_ok == 25 and summary.rows_failed == 0
    predictions = read_predictions(tmp_path / "out" / "predictions.csv")
    assert len(predictions) == 25
    assert predictions["batch_input_file_name"].tolist() == ["0.csv"] * 10 + ["10.csv"] * 10 + ["20.csv"] * 5
    assert predictions["row_number_per_file"].tolist() == list(range(10)) * 2 + list(range(5))
    expected = [prompt + c.text for prompt, c in zip(rows, reference.generate(rows, greedy(6)))]  # return_full_text
    assert predictions["prediction"].tolist() == expected
    assert summary.tokens_out == sum(len(c.token_ids) for c in reference.generate(rows, greedy(6)))
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["rows_ok"] == 25 and saved["tokens_in"] > 0 and saved["tokens_per_s"] > 0
    assert (tmp_path / "out" / "errors.jsonl").read_text() == ""


def test_per_row_parameters_override_job_parameters(tmp_path, engine, reference):
    rows = prompts(4)
    row_parameters = ['{"max_new_tokens": 2, "return_full_text": false}', "", '{"max_gen_len": 3}', ""]
    write_notebook_csvs(tmp_path / "in", rows, extra_columns={"parameters": row_parameters})

    run_batch(tmp_path / "in", tmp_path / "out", engine=engine, parameters={"max_new_tokens": 5}, progress="none")

    got = read_predictions(tmp_path / "out" / "predictions.csv")["prediction"].tolist()
    lengths = [2, 5, 3, 5]
    generated = [reference.generate([p], greedy(n))[0].text for p, n in zip(rows, lengths)]
    assert got == [generated[0], rows[1] + generated[1], rows[2] + generated[2], rows[3] + generated[3]]


def test_jsonl_text_and_chat_rows_and_jsonl_output(tmp_path, engine, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort a list in Python?"}]
    write_jsonl(tmp_path / "in" / "rows.jsonl", [
        {"input_string": "def hello():", "parameters": {"max_new_tokens": 4}},
        {"messages": messages, "parameters": {"max_new_tokens": 5}},
        {"input_string": json.dumps(messages), "parameters": {"max_new_tokens": 5}},  # Azure chat: a JSON list
    ])

    summary = run_batch(tmp_path / "in", tmp_path / "out", engine=engine, output_format="jsonl", progress="none")

    assert summary.rows_ok == 3
    lines = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert [(line["file"], line["row"]) for line in lines] == [("rows.jsonl", 0), ("rows.jsonl", 1), ("rows.jsonl", 2)]
    assert lines[0]["prediction"] == "def hello():" + reference.generate(["def hello():"], greedy(4))[0].text
    reply = reference.chat(messages, greedy(5)).text
    assert lines[1]["prediction"] == reply and lines[2]["prediction"] == reply
    assert all(line["finish_reason"] in ("stop", "length") and line["prompt_tokens"] > 0 for line in lines)


def test_parquet_input_reads_like_csv(tmp_path, engine, reference):
    rows = prompts(5)
    (tmp_path / "in").mkdir()
    pd.DataFrame({"input_string": rows, "parameters": [{"max_new_tokens": 3}] * 5}).to_parquet(tmp_path / "in" / "a.parquet")

    run_batch(tmp_path / "in", tmp_path / "out", engine=engine, progress="none")

    predictions = read_predictions(tmp_path / "out" / "predictions.csv")
    assert predictions["prediction"].tolist() == [p + c.text for p, c in zip(rows, reference.generate(rows, greedy(3)))]
    assert predictions["batch_input_file_name"].tolist() == ["a.parquet"] * 5


def test_summary_only_writes_no_predictions(tmp_path, engine):
    write_notebook_csvs(tmp_path / "in", prompts(3))
    summary = run_batch(tmp_path / "in", tmp_path / "out", engine=engine, parameters={"max_new_tokens": 2},
                        output_action="summary_only", progress="none")
    assert summary.rows_ok == 3 and summary.output_files == ["errors.jsonl", "summary.json"]
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_folders_are_read_recursively_in_a_stable_natural_order(tmp_path):
    for name in ["b/10.csv", "b/2.csv", "a.jsonl", "b/c/1.parquet", "notes.txt", ".hidden.csv", "out/x.csv"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    files = discover_inputs([tmp_path], exclude=tmp_path / "out")
    assert [f.name for f in files] == ["a.jsonl", "b/2.csv", "b/10.csv", "b/c/1.parquet"]


@pytest.mark.parametrize("text, expected", [
    ('"","input_string"\n"0","ok"\n', [(0, "ok", None)]),
    ('input_string,parameters\nfirst,\n,\n"x,y","{""top_k"": 2}"\n', [
        (0, "first", None), (1, None, "the row is empty"), (2, "x,y", None)]),
    ('prompt\nhello\n', [(0, None, "the file has no 'input_string' column (its columns: 'prompt')")]),
    ('input_string\r\na\r\n\r\nb,c\r\n"multi\r\nline"\r\n\r\n\r\n', [  # blank lines at the end are no rows
        (0, "a", None), (1, None, "the row is empty"), (2, None, "the row has 2 fields but the header has 1"),
        (3, "multi\r\nline", None)]),
])
def test_csv_rows_and_row_errors(tmp_path, text, expected):
    (tmp_path / "f.csv").write_text(text)
    [input_file] = discover_inputs([tmp_path / "f.csv"])
    rows = list(read_rows(input_file, 0))
    assert [(r.row, r.request and r.request["prompt"], r.error) for r in rows] == expected
