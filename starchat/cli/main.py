"""`starchat` entry point. Each command group lives in its own module; this file only registers them."""

from __future__ import annotations

import typer

from starchat.cli import batch, generate
from starchat.cli import train
from starchat.cli import serve
from starchat.cli import bench
from starchat.cli import pack, quantize

app = typer.Typer(
    name="starchat",
    help="Serve, batch, chat with and train StarChat / GPTBigCode models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("generate")(generate.generate_command)
app.command("chat")(generate.chat_command)
app.command("serve")(serve.serve_command)
app.command("batch")(batch.batch_command)
app.command("quantize", short_help="Write MODEL with int8 weights into OUTPUT, to load in half the bytes "
            "without quantizing at every start.")(quantize.quantize_command)
app.command("pack", short_help="Write MODEL into OUTPUT with its weights in the CPU kernels' panels, "
            "mapped at load instead of repacked.")(pack.pack_command)
app.add_typer(train.train_app, name="train")
app.add_typer(bench.bench_app, name="bench")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
