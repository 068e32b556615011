"""`starchat pack`: a float checkpoint written once as the CPU kernels read it, for fast restarts."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from starchat.cli.common import one_line_errors, stderr_is_terminal


def pack_command(
    model: str = typer.Argument(..., help="Float checkpoint: a folder (Hugging Face layout) or a Hub id."),
    output: Path = typer.Argument(..., help="New folder for the packed checkpoint (must not exist)."),
    dtype: str = typer.Option("auto", help="float16, bfloat16 or float32; auto: the checkpoint's torch_dtype. "
                              "Engines that load OUTPUT in this dtype on a CPU map its weights as they lie."),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit) of MODEL."),
    max_shard_size: float = typer.Option(2.0, min=0.01, help="Largest safetensors shard, in GiB."),
):
    """Write MODEL into OUTPUT with its Linear weights in the CPU kernels' panels (a tied embedding
    stored once, as the packed lm_head): a CPU engine then maps the files instead of reading and
    repacking them, so a restart finds the weights in the page cache and processes serving OUTPUT
    share one copy. GPUs load it too (unpacked at load). For int8 weights use `starchat quantize`."""
    import torch

    from starchat.model.loader import resolve_model_dir
    from starchat.model.packed_checkpoint import write_packed_checkpoint

    with one_line_errors():
        dtypes = {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
        if dtype not in dtypes:
            raise ValueError(f"--dtype: one of {', '.join(dtypes)}, got {dtype!r}")
        source = resolve_model_dir(model, revision)
        written = write_packed_checkpoint(source, output, dtypes[dtype], max_shard_bytes=int(max_shard_size * (1 << 30)),
                                          progress=stderr_is_terminal())
    typer.echo(f"wrote {written} (panels); load it with --model {written}")
