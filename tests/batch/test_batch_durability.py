"""Kill -9 at random moments and resume: every row exactly once, equal to an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from batch_helpers import engine, one_torch_thread, prompts, read_predictions, write_notebook_csvs  # noqa: F401
from starchat.batch import run_batch
from starchat.batch.journal import Journal, job_manifest

REPO = Path(__file__).resolve().parents[2]
PARAMETERS = '{"max_new_tokens": 4}'


def start_job(input_dir: Path, output_dir: Path, model_dir: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "starchat.cli.main", "batch", str(input_dir), "--output", str(output_dir),
               "--model", str(model_dir), "--dtype", "float32", "--parameters", PARAMETERS,
               "--max-concurrency", "4", "--mini-batch-size", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def journal_lines(output_dir: Path) -> list[bytes]:
    path = output_dir / ".starchat-batch" / "results.jsonl"
    return path.read_bytes().split(b"\n")[:-1] if path.exists() else []  # complete lines only


def check_consistent(output_dir: Path) -> int:
    """What a reader may see after a kill: unique journal rows, and whole output files only."""
    keys = [tuple(json.loads(line)["k"]) for line in journal_lines(output_dir)[:-1]]  # the last may be torn
    assert len(keys) == len(set(keys)), "a row was recorded twice"
    if (output_dir / "summary.json").exists():
        json.loads((output_dir / "summary.json").read_text())
    return len(keys)


def test_sigkill_at_random_moments_then_resume_loses_and_duplicates_nothing(tmp_path, engine, tiny_model_dir):
    rows = prompts(160)
    write_notebook_csvs(tmp_path / "in", rows)
    rng = random.Random(1234)
    output_dir = tmp_path / "out"
    kills = 0
    # While importing / loading the model, then three times mid-generation (one of them Ctrl-C).
    for moment, stop in [("start", signal.SIGKILL), ("rows", signal.SIGKILL), ("rows", signal.SIGINT), ("rows", signal.SIGKILL)]:
        job = start_job(tmp_path / "in", output_dir, tiny_model_dir)
        if moment == "start":
            time.sleep(rng.uniform(0.3, 1.5))
        else:
            target = len(journal_lines(output_dir)) + rng.randint(3, 30)
            while job.poll() is None and len(journal_lines(output_dir)) < target:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.03))
        if job.poll() is not None:
            break
        job.send_signal(stop)
        output = job.communicate(timeout=60)[0].decode()
        kills += 1
        if stop == signal.SIGINT:
            assert job.returncode == 130, output
            assert json.loads((output_dir / "summary.json").read_text())["status"] == "interrupted"
        check_consistent(output_dir)
    assert kills == 4 and 0 < len(journal_lines(output_dir)) < 160
    final = start_job(tmp_path / "in", output_dir, tiny_model_dir)
    output = final.communicate(timeout=120)[0].decode()
    assert final.returncode == 0, output
    assert not list(output_dir.glob(".*.tmp"))

    run_batch(tmp_path / "in", tmp_path / "reference", engine=engine, parameters=json.loads(PARAMETERS),
              dtype="float32", progress="none")
    resumed = read_predictions(output_dir / "predictions.csv")
    assert len(resumed) == 160
    assert len(set(zip(resumed["batch_input_file_name"], resumed["row_number_per_file"]))) == 160
    assert (output_dir / "predictions.csv").read_bytes() == (tmp_path / "reference" / "predictions.csv").read_bytes()
    assert check_consistent(output_dir) == 159  # all 160 journal lines (the last one not checked for tearing)
    assert json.loads((output_dir / "summary.json").read_text())["rows_ok"] == 160


def test_torn_journal_tail_is_cut_off_on_resume(tmp_path):
    manifest = job_manifest([], {"x": 1})
    journal = Journal.open(tmp_path, manifest, restart=False, output_names=[])
    journal.append([{"k": [0, 0], "ok": True}, {"k": [0, 1], "ok": True}])
    journal.close()
    with open(journal.results_path, "ab") as handle:
        handle.write(b'{"k": [0, 2], "ok": tr')  # killed in the middle of a write
    reopened = Journal.open(tmp_path, manifest, restart=False, output_names=[])
    assert reopened.done == {(0, 0), (0, 1)}
    reopened.append([{"k": [0, 2], "ok": True}, {"k": [0, 1], "ok": False}])  # (0, 1) is done: not written again
    reopened.close()
    assert [r["k"] for r in reopened.sorted_records()] == [[0, 0], [0, 1], [0, 2]]
    assert all(r["ok"] for r in reopened.sorted_records())
