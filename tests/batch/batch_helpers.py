"""Fixtures and input writers shared by the batch tests (imported by name, as a plain module)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from starchat import LLM, SamplingParams
from starchat.config import EngineConfig
from starchat.engine.engine import LLMEngine

AZUREML_NAMES = ["row_number_per_file", "prediction", "batch_input_file_name"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The test machine's two cores are shared: one thread avoids OpenMP spin contention (6x faster here)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", max_num_seqs=8), progress=False)


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> LLM:
    """An independent offline LLM on the same checkpoint: what every prediction must equal."""
    return LLM(str(tiny_model_dir), dtype="float32", progress=False)


def prompts(count: int, start: int = 0) -> list[str]:
    """Short prompts with the characters CSV quoting must survive: commas, quotes, newlines."""
    return [f'# task {i}: add {i}, then "{i * 7 % 13}"\ndef add_{i}(a, b):' for i in range(start, start + count)]


def write_notebook_csvs(folder: Path, rows: list[str], rows_per_file: int = 10, extra_columns: dict | None = None) -> list[Path]:
    """CSV files exactly as the Azure ML model catalog's notebook writes them: a DataFrame with an
    `input_string` column, split every 10 rows, `to_csv(path, quoting=csv.QUOTE_ALL)` (index kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame({"input_string": rows, **(extra_columns or {})})
    paths = []
    for start in range(0, len(frame), rows_per_file):
        path = folder / f"{start}.csv"
        frame[start:start + rows_per_file].to_csv(path, quoting=csv.QUOTE_ALL)
        paths.append(path)
    return paths


def write_jsonl(path: Path, items: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items), encoding="utf-8")
    return path


def read_predictions(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, header=None, names=AZUREML_NAMES, keep_default_na=False)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


def greedy(max_new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens)
