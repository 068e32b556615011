"""The runner's feeding and reporting: the batch stays full until the rows run out; progress lines."""

from __future__ import annotations

from batch_helpers import engine, one_torch_thread, prompts, write_jsonl  # noqa: F401
from starchat.batch import run_batch


def test_engine_batch_stays_full_until_the_rows_run_out(tmp_path, engine, monkeypatch):
    # Rows of different lengths finish at different steps: a mini-batch-at-a-time runner would let
    # the batch drain and refill; continuous feeding refills each slot at the next step.
    write_jsonl(tmp_path / "in" / "a.jsonl", [
        {"input_string": p, "parameters": {"max_new_tokens": 1 + i % 7, "min_new_tokens": 1 + i % 7}}
        for i, p in enumerate(prompts(40))])
    sizes, real_step = [], engine.step

    def counting_step():
        stats = engine.stats()
        sizes.append(stats.num_running + stats.num_waiting)
        return real_step()

    monkeypatch.setattr(engine, "step", counting_step)
    summary = run_batch(tmp_path / "in", tmp_path / "out", engine=engine, mini_batch_size=10, progress="none")

    assert summary.rows_ok == 40
    full = engine.config.max_num_seqs
    first_short = next(i for i, size in enumerate(sizes) if size < full)
    assert first_short > 5 and all(size < full for size in sizes[first_short:])  # only the tail drains
    assert sizes[first_short:] == sorted(sizes[first_short:], reverse=True)


def test_plain_progress_lines_when_not_on_a_terminal(tmp_path, engine, capsys):
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"input_string": p, "parameters": {"max_new_tokens": 2}} for p in prompts(6)])
    run_batch(tmp_path / "in", tmp_path / "out", engine=engine, log_interval_s=0.0)
    lines = capsys.readouterr().err.splitlines()
    assert any(line.startswith("batch: 6/6 rows (100%), 0 failed,") and "tok/s" in line and "ETA" in line for line in lines)
    assert lines[-1].startswith("batch: completed: 6 ok, 0 failed, 0 pending of 6 rows")
    run_batch(tmp_path / "in", tmp_path / "out", engine=engine, log_interval_s=0.0)
    assert "resuming: 6 of 6 rows were finished by an earlier run" in capsys.readouterr().err
