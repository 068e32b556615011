"""`starchat batch`: files of prompts in, predictions out (Azure ML batch / OpenAI batch semantics)."""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import List, Optional

import typer

from starchat.cli.common import MODEL_HELP, one_line_errors, print_notice


def batch_command(
    inputs: List[str] = typer.Argument(..., metavar="INPUT...", show_default=False,
                                        help="Input files or folders (searched recursively): CSV with an input_string "
                                             "column, JSONL, OpenAI batch JSONL, Parquet."),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder; the same command resumes an unfinished job."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    output_format: Optional[str] = typer.Option(None, "--format", help="azureml, openai or jsonl; default: openai "
                                                "when every input is an OpenAI batch file, else azureml."),
    mini_batch_size: int = typer.Option(10, "--mini-batch-size", help="Rows per durable checkpoint of the journal "
                                        "(and per Ray task)."),
    error_threshold: int = typer.Option(-1, "--error-threshold", help="Stop when more rows than this failed; "
                                        "-1 never stops, 0 stops at the first failure."),
    max_retries: int = typer.Option(3, "--max-retries", help="Retries of a row after a transient engine error."),
    output_action: str = typer.Option("append_row", "--output-action", help="append_row writes the predictions "
                                      "file; summary_only writes only summary.json and errors.jsonl."),
    output_file_name: Optional[str] = typer.Option(None, "--output-file-name", help="Predictions file name; default "
                                                   "predictions.csv (azureml) or predictions.jsonl."),
    parameters: Optional[str] = typer.Option(None, "--parameters", help="Job-wide generation parameters as JSON, "
                                             'with the /score names, e.g. \'{"max_new_tokens": 64}\'.'),
    max_concurrency: Optional[int] = typer.Option(None, "--max-concurrency", help="Rows generated at once by each "
                                                  "engine (its continuous batch); default: the engine's 64."),
    ray: bool = typer.Option(False, "--ray", help="Run on Ray: --ray alone starts a local cluster; --ray ADDRESS "
                                                  "(host:port, ray://host:port or auto) joins one started with "
                                                  "`ray start --head`."),
    restart: bool = typer.Option(False, "--restart", help="Discard the progress of an earlier, different job in "
                                 "the output folder and start over."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
):
    """Generate a prediction for every row of INPUT files into --output (resumable; see docs/BATCH.md)."""
    from starchat.batch import run_batch

    inputs, ray_target = _split_ray_address(inputs, ray)
    print_notice(model)
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # a scheduler's stop ends as cleanly as Ctrl-C
    try:
        with one_line_errors():
            summary = run_batch(
                inputs, output, model=model, dtype=dtype, device=device, output_format=output_format,
                parameters=parameters, mini_batch_size=mini_batch_size, error_threshold=error_threshold,
                max_retries=max_retries, output_action=output_action, output_file_name=output_file_name,
                max_concurrency=max_concurrency, restart=restart, ray=ray_target)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not summary.ok:
        typer.echo(f"error: {summary.message}", err=True)
        raise typer.Exit(1)


_RAY_ADDRESS = re.compile(r"^(ray://)?[\w.\-\[\]:]+:\d+$|^(auto|local)$")


def _split_ray_address(inputs: list[str], ray: bool) -> tuple[list[str], bool | str]:
    """`--ray ADDRESS`: Typer has no options with an optional value, so `--ray` is a flag and an
    ADDRESS after it arrives among the inputs; an input that looks like a Ray address (and is no
    existing path) is taken as the address."""
    if not ray:
        return inputs, False
    addresses = [p for p in inputs if _RAY_ADDRESS.match(p) and not Path(p).exists()]
    if len(addresses) > 1:
        raise typer.BadParameter(f"more than one Ray address: {', '.join(map(str, addresses))}", param_hint="--ray")
    if not addresses:
        return inputs, True
    return [p for p in inputs if p not in addresses], addresses[0]


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt
