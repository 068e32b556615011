"""Bad rows, the error threshold, changed jobs, unreadable inputs, transient engine errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from batch_helpers import engine, one_torch_thread, prompts, read_jsonl, read_predictions, write_jsonl  # noqa: F401
from starchat.batch import BatchOptionError, run_batch
from starchat.batch.journal import JobChangedError
from starchat.batch.readers import InputPathError

LONG_PROMPT = "x = 1\n" * 400  # ~800 tokens: more than the tiny model's 512-token context


def write_mixed_inputs(folder):
    """Eight rows, five of them bad, at known (file, row) places."""
    folder.mkdir()
    (folder / "a.csv").write_bytes(b'"","input_string"\n"0","def ok_a():"\n"1",""\n"2","caf\xe9 ok?"\n"3","def ok_b():"\n')
    (folder / "b.csv").write_text('"","prompt"\n"0","no input_string column"\n')
    write_jsonl(folder / "c.jsonl", [{"input_string": "def ok_c():"}, '{"input_string": "unterminated',
                                     {"input_string": LONG_PROMPT}])
    return {("a.csv", 1): "input_string is empty", ("a.csv", 2): "input_string is not valid UTF-8",
            ("b.csv", 0): "no 'input_string' column", ("c.jsonl", 1): "not valid JSON",
            ("c.jsonl", 2): "do not fit the context"}


def test_bad_rows_go_to_errors_jsonl_and_the_job_goes_on(tmp_path, engine):
    expected = write_mixed_inputs(tmp_path / "in")

    summary = run_batch(tmp_path / "in", tmp_path / "out", engine=engine, parameters={"max_new_tokens": 3}, progress="none")

    assert (summary.status, summary.rows_total, summary.rows_ok, summary.rows_failed) == ("completed", 8, 3, 5)
    errors = read_jsonl(tmp_path / "out" / "errors.jsonl")
    assert [(e["file"], e["row"]) for e in errors] == list(expected)  # sorted by file and row
    for entry in errors:
        assert expected[(entry["file"], entry["row"])] in entry["message"] and entry["attempts"] == 1
    predictions = read_predictions(tmp_path / "out" / "predictions.csv")
    assert list(zip(predictions["batch_input_file_name"], predictions["row_number_per_file"])) == [
        ("a.csv", 0), ("a.csv", 3), ("c.jsonl", 0)]


@pytest.mark.parametrize("threshold", [0, 2])
def test_error_threshold_stops_after_threshold_plus_one_failures(tmp_path, engine, threshold):
    write_mixed_inputs(tmp_path / "in")

    summary = run_batch(tmp_path / "in", tmp_path / "out", engine=engine, parameters={"max_new_tokens": 3},
                        error_threshold=threshold, progress="none")

    assert summary.status == "stopped" and summary.rows_failed == threshold + 1
    assert len(read_jsonl(tmp_path / "out" / "errors.jsonl")) == threshold + 1
    assert summary.rows_pending > 0 and not (tmp_path / "out" / "predictions.csv").exists()
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["status"] == "stopped"
    # The same command again stays stopped without generating anything; a higher threshold resumes.
    again = run_batch(tmp_path / "in", tmp_path / "out", engine=engine, parameters={"max_new_tokens": 3},
                      error_threshold=threshold, progress="none")
    assert again.status == "stopped" and again.rows_failed == threshold + 1
    finished = run_batch(tmp_path / "in", tmp_path / "out", engine=engine, parameters={"max_new_tokens": 3},
                         progress="none")
    assert (finished.status, finished.rows_ok, finished.rows_failed) == ("completed", 3, 5)


def test_changed_input_or_parameters_are_refused_unless_restart(tmp_path, engine):
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"input_string": p} for p in prompts(3)])
    run_batch(tmp_path / "in", tmp_path / "out", engine=engine, parameters={"max_new_tokens": 2}, progress="none")

    with pytest.raises(JobChangedError, match="settings changed: parameters.*--restart"):
        run_batch(tmp_path / "in", tmp_path / "out", engine=engine, parameters={"max_new_tokens": 3}, progress="none")
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"input_string": p} for p in prompts(4)])
    with pytest.raises(JobChangedError, match="input changed: a.jsonl"):
        run_batch(tmp_path / "in", tmp_path / "out", engine=engine, parameters={"max_new_tokens": 2}, progress="none")

    summary = run_batch(tmp_path / "in", tmp_path / "out", engine=engine, parameters={"max_new_tokens": 2},
                        restart=True, progress="none")
    assert summary.rows_ok == 4 and summary.rows_skipped == 0


def test_missing_input_path_stops_before_any_work(tmp_path, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the engine was loaded")

    monkeypatch.setattr("starchat.batch.runner._load_engine", must_not_load)
    with pytest.raises(InputPathError, match="does not exist"):
        run_batch([tmp_path / "missing"], tmp_path / "out", progress="none")
    with pytest.raises(BatchOptionError, match="--output-action"):
        run_batch([tmp_path], tmp_path / "out", output_action="append", progress="none")
    assert not (tmp_path / "out").exists()


def test_cli_reports_a_missing_input_in_one_line(tmp_path):
    from starchat.cli.main import app

    result = CliRunner().invoke(app, ["batch", str(tmp_path / "nope.csv"), "--output", str(tmp_path / "out")])
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: input path {str(tmp_path / 'nope.csv')!r} does not exist"]


def test_transient_engine_errors_are_retried(tmp_path, engine, monkeypatch):
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"input_string": p} for p in prompts(5)])
    real_step, calls = engine.step, {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] in (2, 3):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_step()

    monkeypatch.setattr(engine, "step", flaky_step)
    summary = run_batch(tmp_path / "in", tmp_path / "out", engine=engine, parameters={"max_new_tokens": 3},
                        output_format="jsonl", progress="none")
    assert (summary.rows_ok, summary.rows_failed) == (5, 0)
    attempts = [json.loads(line)["attempts"] for line in (tmp_path / "out" / ".starchat-batch" / "results.jsonl").open()]
    assert attempts == [3] * 5  # all 5 were in flight at both failures: run three times

    monkeypatch.setattr(engine, "step", lambda: (_ for _ in ()).throw(RuntimeError("device lost")))
    summary = run_batch(tmp_path / "in", tmp_path / "out2", engine=engine, max_retries=1, progress="none")
    assert summary.rows_failed == 5
    assert {(e["attempts"], "device lost" in e["message"]) for e in read_jsonl(tmp_path / "out2" / "errors.jsonl")} == {(2, True)}
    assert not engine.has_unfinished_requests()


def test_rows_of_several_samples_are_seeded_apart_and_retried_whole(tmp_path, engine, monkeypatch):
    """OpenAI lines with n > 1 run as n requests (seeds seed + i); an engine failure while some of
    a row's samples are finished runs the whole row again, and the row is written once, whole."""
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": p, "max_tokens": 3 + i, "temperature": 1.0, "seed": 100 * i, "n": 3}}
             for i, p in enumerate(prompts(3))]
    write_jsonl(tmp_path / "in" / "a.jsonl", lines)
    real_step, real_add, calls, seeds = engine.step, engine.add_request, {"n": 0}, []

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 4:  # the first row (3 tokens a sample) has finished by now; the others have not
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_step()

    def recording_add(prompt, params, *args, **kwargs):
        seeds.append(params.seed)
        return real_add(prompt, params, *args, **kwargs)

    monkeypatch.setattr(engine, "step", flaky_step)
    monkeypatch.setattr(engine, "add_request", recording_add)
    summary = run_batch(tmp_path / "in", tmp_path / "out", engine=engine, progress="none")
    assert (summary.rows_ok, summary.rows_failed) == (3, 0)
    records = read_jsonl(tmp_path / "out" / ".starchat-batch" / "results.jsonl")
    attempts = {record["custom_id"]: record["attempts"] for record in records}
    assert attempts["r0"] == 1 and attempts["r2"] == 2
    retried = [f"r{i}" for i in range(3) if attempts[f"r{i}"] == 2]
    assert seeds[:9] == [0, 1, 2, 100, 101, 102, 200, 201, 202]
    assert seeds[9:] == [100 * int(row[1:]) + i for row in retried for i in range(3)]  # whole rows again
    output = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert [line["custom_id"] for line in output] == ["r0", "r1", "r2"]
    for i, line in enumerate(output):
        body = line["response"]["body"]
        assert [choice["index"] for choice in body["choices"]] == [0, 1, 2]
        assert body["usage"]["completion_tokens"] == 3 * (3 + i)
    assert not engine.has_unfinished_requests()


def test_a_job_that_failed_before_its_first_row_can_be_rerun_with_other_settings(tmp_path, engine):
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"input_string": "def f():"}])
    with pytest.raises(Exception, match="no-such-model"):
        run_batch(tmp_path / "in", tmp_path / "out", model=str(tmp_path / "no-such-model"), progress="none")
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["status"] == "failed"
    summary = run_batch(tmp_path / "in", tmp_path / "out", engine=engine, parameters={"max_new_tokens": 2}, progress="none")
    assert summary.rows_ok == 1
