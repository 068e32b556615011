"""`starchat` entry point. Each command group lives in its own module; this file only registers them."""

from __future__ import annotations

import typer

from starchat.cli import generate

app = typer.Typer(
    name="starchat",
    help="Serve, batch, chat with and train StarChat / GPTBigCode models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("generate")(generate.generate_command)
app.command("chat")(generate.chat_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
