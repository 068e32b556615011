"""Pieces every command shares: model options, the demo-model notice, errors as one line."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import typer

from starchat.model.loader import EMBEDDED_MODEL_DIR

MODEL_HELP = "Model folder (Hugging Face layout) or Hub id; default: AZUREML_MODEL_DIR, else the embedded starchat-nano."


def model_notice(model: str | None) -> str | None:
    """The embedded model card's notice line (its first '> ' line) when the embedded model is used."""
    if model is not None or os.environ.get("AZUREML_MODEL_DIR"):
        return None
    card = EMBEDDED_MODEL_DIR / "README.md"
    if card.is_file():
        for line in card.read_text(encoding="utf-8").splitlines():
            if line.startswith("> "):
                return f"starchat: {line[2:].strip()}"
    return "starchat: using the embedded starchat-nano demo model; pass --model for a real checkpoint"


def print_notice(model: str | None) -> None:
    notice = model_notice(model)
    if notice:
        typer.echo(notice, err=True)


@contextmanager
def one_line_errors():
    """User-facing failures (bad model folder, bad parameter) exit 1 with one line, not a traceback."""
    from starchat.config import ModelConfigError
    from starchat.model.loader import CheckpointError

    try:
        yield
    except (CheckpointError, ModelConfigError, ValueError, FileNotFoundError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("", err=True)
        raise typer.Exit(130) from None


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()
