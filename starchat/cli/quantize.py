"""`starchat quantize`: a float checkpoint written once with int8 weights, for faster loads."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from starchat.cli.common import one_line_errors, stderr_is_terminal


def quantize_command(
    model: str = typer.Argument(..., help="Float checkpoint: a folder (Hugging Face layout) or a Hub id; or a folder "
                                "this command wrote with --layout rows, rewritten in panels."),
    output: Path = typer.Argument(..., help="New folder for the quantized checkpoint (must not exist)."),
    method: str = typer.Option("int8", help="int8: weight-only int8 with a float32 scale per output channel."),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit) of MODEL."),
    max_shard_size: float = typer.Option(2.0, min=0.01, help="Largest safetensors shard, in GiB."),
    layout: str = typer.Option("panels", help="panels: as starchat's CPU kernels read them, used in place (mapped "
                               "from the files, not copied or repacked); rows: Hugging Face's (out, in) orientation, "
                               "repacked at every load."),
):
    """Write MODEL with int8 weights into OUTPUT: the same model `--quantize int8` builds while
    loading, bit for bit, in half a 16-bit checkpoint's bytes and without quantizing at every
    start (StarChat-beta: 16.2 GB to read instead of 31). Every command loads OUTPUT as int8."""
    from starchat.model.loader import resolve_model_dir
    from starchat.model.quantized_checkpoint import WEIGHT_LAYOUTS, write_quantized_checkpoint

    with one_line_errors():
        if method != "int8":
            raise ValueError(f"--method: only int8 is supported, got {method!r}")
        if layout not in WEIGHT_LAYOUTS:
            raise ValueError(f"--layout: one of {', '.join(WEIGHT_LAYOUTS)}, got {layout!r}")
        source = resolve_model_dir(model, revision)
        written = write_quantized_checkpoint(source, output, max_shard_bytes=int(max_shard_size * (1 << 30)),
                                             progress=stderr_is_terminal(), layout=layout)
    typer.echo(f"wrote {written} (int8, {layout}); load it with --model {written}")
