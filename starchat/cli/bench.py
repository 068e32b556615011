"""`starchat bench latency|throughput`: our engine on a real or random checkpoint, HF optional, same run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

bench_app = typer.Typer(help="Benchmarks: ours against HF transformers, measured in the same run.", no_args_is_help=True)

SHAPE_HELP = "Random-weight model of a named shape: starchat-beta, starcoder, tiny_starcoder (ignored with --model)."


def _setup(model: Optional[str], shape: str, dtype: str, device: str, quantize: Optional[str], max_num_seqs: int,
           prompt_len: int, new_tokens: int, hf: bool = False):
    from starchat.bench.checkpoints import random_checkpoint
    from starchat.bench.machine import describe_machine
    from starchat.bench.offline import check_hf_readable
    from starchat.cli.common import one_line_errors
    from starchat.engine.devices import resolve_device
    from starchat.llm import LLM

    with one_line_errors():
        model_dir = Path(model) if model else random_checkpoint(shape)
        if hf:  # before loading ours: a baseline that cannot run is known at once
            check_hf_readable(model_dir)
        # Prefix caching off: the figures are those of computing every token (the latency figures
        # repeat one prompt, which would otherwise be found cached), as the HF baseline does.
        llm = LLM(str(model_dir), dtype=dtype, device=device, quantize=quantize, progress=False,
                  max_num_seqs=max_num_seqs, enable_prefix_caching=False)
        if prompt_len + new_tokens > llm.engine.max_model_len:  # known before any side is measured
            raise ValueError(f"--prompt-len {prompt_len} + --new-tokens {new_tokens} exceed the model's context of "
                             f"{llm.engine.max_model_len} tokens; ask for fewer")
    machine = describe_machine(resolve_device(device))
    typer.echo(f"machine: {machine}")
    typer.echo(f"model: {model_dir} dtype {llm.engine.dtype} device {llm.engine.device} quantize {llm.engine.quantize}")
    return model_dir, llm, machine


def _report(rows: dict, output: Optional[str], payload: dict) -> None:
    for name, figures in rows.items():
        typer.echo(f"{name:6s} " + "  ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()))
    if "hf" in rows:
        for key, value in rows["ours"].items():
            if isinstance(value, float) and rows["hf"].get(key):
                better = rows["hf"][key] / value if key.endswith(("ms", "ms_per_token", "seconds")) else value / rows["hf"][key]
                typer.echo(f"ours/hf {key}: x{better:.2f}")
    if output:
        Path(output).write_text(json.dumps(payload, indent=2) + "\n")


@bench_app.command("latency")
def latency_command(
    model: Optional[str] = typer.Option(None, "--model", "-m"),
    shape: str = typer.Option("tiny_starcoder", help=SHAPE_HELP),
    dtype: str = typer.Option("auto"),
    device: str = typer.Option("auto"),
    quantize: Optional[str] = typer.Option(None),
    new_tokens: int = typer.Option(128, min=1),
    prompt_len: int = typer.Option(128, min=1, help="Prompt length for the time-to-first-token figure."),
    hf: bool = typer.Option(False, "--hf", help="Also run HF transformers generate as the baseline."),
    rounds: int = typer.Option(3, min=1, help="With --hf: rounds of both sides in turn (medians; the host drifts)."),
    output: Optional[str] = typer.Option(None, "--json", help="Write the figures as JSON here."),
):
    """Batch-1 decode: ms/token, tokens/s, achieved GB/s beside the bandwidth floor."""
    from starchat.bench.machine import measure_read_bandwidth
    from starchat.bench.offline import HFBaseline, interleave, median_latency, ours_latency, round_ratios

    model_dir, llm, machine = _setup(model, shape, dtype, device, quantize, 8, prompt_len, new_tokens, hf=hf)
    sides = {"ours": lambda: ours_latency(llm, new_tokens, prompt_len)}
    if hf:
        baseline = HFBaseline(model_dir, str(llm.engine.dtype).removeprefix("torch."), str(llm.engine.device))
        sides["hf"] = lambda: baseline.latency(new_tokens, prompt_len)
    measured = interleave(sides, rounds if hf else 1)
    ours = median_latency(measured["ours"])
    bandwidth = measure_read_bandwidth(llm.engine.device)
    floor_ms = 1e3 * ours.weight_bytes_per_token / bandwidth
    typer.echo(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s -> decode floor {floor_ms:.2f} ms/token "
               f"({1e3 / floor_ms:.0f} tokens/s); ours reaches {100 * floor_ms / ours.ms_per_token:.0f}% of it")
    rows = {name: median_latency(results).as_dict() for name, results in measured.items()}
    payload = {"machine": machine, "bandwidth_bytes_per_s": bandwidth, "floor_ms_per_token": floor_ms, **rows,
               "rounds": {name: [result.as_dict() for result in results] for name, results in measured.items()}}
    if hf:
        ratios = round_ratios([r.tokens_per_s for r in measured["ours"]], [r.tokens_per_s for r in measured["hf"]])
        payload["ours_vs_hf_tokens_per_s_rounds"] = ratios
        typer.echo("ours/hf tokens/s per round (taken in turns): " + " ".join(f"x{ratio:.2f}" for ratio in ratios))
    _report(rows, output, payload)


@bench_app.command("throughput")
def throughput_command(
    model: Optional[str] = typer.Option(None, "--model", "-m"),
    shape: str = typer.Option("tiny_starcoder", help=SHAPE_HELP),
    dtype: str = typer.Option("auto"),
    device: str = typer.Option("auto"),
    quantize: Optional[str] = typer.Option(None),
    num_prompts: int = typer.Option(32, min=1),
    prompt_len: int = typer.Option(128, min=1),
    new_tokens: int = typer.Option(128, min=1),
    max_concurrent: Optional[int] = typer.Option(
        None, min=1, help="Requests running at once (the engine's batch; the rest wait): the offline side of a "
                          "`starchat serve --max-concurrent-requests N` + `starchat bench serve --concurrency N` "
                          "run. Default: all of them."),
    hf: bool = typer.Option(False, "--hf", help="Also run HF transformers generate (one static batch) as the baseline."),
    output: Optional[str] = typer.Option(None, "--json"),
):
    """N requests end to end (all at once, or --max-concurrent at a time): output tokens/s."""
    from starchat.bench.offline import HFBaseline, ours_throughput

    model_dir, llm, machine = _setup(model, shape, dtype, device, quantize, max_concurrent or max(64, num_prompts),
                                     prompt_len, new_tokens, hf=hf)
    rows = {"ours": {**ours_throughput(llm, num_prompts, prompt_len, new_tokens).as_dict(),
                     "max_concurrent": llm.engine.config.max_num_seqs}}
    if hf:
        rows["hf"] = HFBaseline(model_dir, str(llm.engine.dtype).removeprefix("torch."), str(llm.engine.device)).throughput(
            num_prompts, prompt_len, new_tokens).as_dict()
    _report(rows, output, {"machine": machine, **rows})


@bench_app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                              "help_option_names": []})
def serve_command(context: typer.Context):
    """Load-test a running `starchat serve` (TTFT, TPOT, ITL percentiles); `starchat bench serve --help` lists options."""
    from starchat.bench.serve import main as serve_main

    raise typer.Exit(serve_main(list(context.args)))
