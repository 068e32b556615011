"""The GPU table of the speed issue in one run: a named shape (default StarChat-beta), random
bf16 weights drawn on the GPU, our engine against HF transformers: CUDA graphs with starchat's
Triton kernels, the same graphs through PyTorch's kernels (their same-run baseline), eager on request.

    python3 bench/gpu_suite.py --json $OUT/gpu_suite.json            # on a GPU machine, ~4 minutes
    python3 bench/gpu_suite.py --device cpu --shape tiny_starcoder --quick   # pipeline check

Figures, each for HF (`generate`, SDPA, greedy) and ours, in this order so both fit one GPU:
- the device-to-device copy bandwidth and the batch-1 floor it implies (weight bytes / bandwidth);
- batch-1 decode: ms/token (new tokens after the first, prefill excluded) and achieved GB/s;
- N concurrent sequences (128-token prompts, 128 new): output tokens/s end to end, prefill
  included; ours through the continuous-batching scheduler, HF as one static batch; ours also
  over the decode-only steps (`host_ms_per_step.decode_tokens_per_s`: the rate that fixed-batch
  decode loops report, the issue's 128-sequence anchor among them);
- prefill of one 2,048-token prompt: tokens/s (ours = time to first token);
- a speculative decode's verify step (1 sequence, k drafts as k + 1 rows in CUDA graphs) against
  a plain decode step, ms and ratio (`verify_steps`);
- where a decode step's GPU time goes, at 1 and at N sequences (`decode_profile`: kernels by kind
  and the top kernels, from PyTorch's profiler);
- int8 weights (ours): batch-1 decode (`int8_kernel` says which product ran: Triton or dequantize;
  `decode_products` which kernel each layer shape got) and its profile.
Every figure is printed as measured and written to --json with the machine's description.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from starchat.bench.machine import describe_machine, measure_read_bandwidth, synchronize  # noqa: E402
from starchat.bench.offline import (HFBaseline, host_step_timers, ours_latency, random_prompts,  # noqa: E402
                                    weight_bytes_read_per_token)
from starchat.config import NAMED_SHAPES, ModelConfig  # noqa: E402
from starchat.llm import LLM  # noqa: E402
from starchat.model import triton_support  # noqa: E402
from starchat.model.loader import EMBEDDED_MODEL_DIR  # noqa: E402
from starchat.sampling_params import SamplingParams  # noqa: E402


def config_only_model_dir(shape: str, folder: Path) -> Path:
    """config.json of the shape and the real tokenizer; weights come from load_format='random'."""
    config = ModelConfig(**NAMED_SHAPES[shape], multi_query=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict() | {"torch_dtype": "bfloat16"}, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_bytes((EMBEDDED_MODEL_DIR / name).read_bytes())
    return folder


def timed(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def hf_figures(model_dir: Path, device: torch.device, args) -> dict:
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    config = GPTBigCodeConfig.from_pretrained(model_dir, attn_implementation="sdpa")
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = GPTBigCodeForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    baseline = HFBaseline(model_dir, "bfloat16", str(device), model=model)
    figures = {"latency": baseline.latency(args.latency_tokens, args.prompt_len).as_dict(), "concurrent": {}}
    for count in args.concurrent:
        result = baseline.throughput(count, args.prompt_len, args.new_tokens)
        figures["concurrent"][count] = {"output_tokens_per_s": result.output_tokens_per_s, "seconds": result.seconds}
        print(f"HF {count} sequences: {result.output_tokens_per_s:.0f} output tokens/s", flush=True)
    long_prompt = torch.tensor(random_prompts(1, args.prefill_len, seed=3), device=device)
    with torch.inference_mode():
        model(long_prompt)
        seconds = min(timed(lambda: model(long_prompt), device) for _ in range(3))
    figures["prefill_tokens_per_s"] = args.prefill_len / seconds
    del model, baseline
    gc.collect()
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return figures


def ours_figures(llm: LLM, device: torch.device, args) -> dict:
    # False where asked for, or where the load-time check turned the Triton kernels off (logged why)
    figures = {"triton_kernels": llm.engine.runner.decode_kernel_reads_tables,
               "mlps_with_gelu_in_up_projection": llm.engine.runner.fused_gelus,
               "decode_products": [{**row, "shape": list(row["shape"]), "blocks": list(row["blocks"])}
                                   for row in llm.engine.runner.decode_products],
               "latency": ours_latency(llm, args.latency_tokens, args.prompt_len).as_dict(), "concurrent": {}}
    for count in args.concurrent:
        figures["concurrent"][count] = concurrent_figures(llm, device, count, args)
    long_prompt = random_prompts(1, args.prefill_len, seed=3)[0]
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    llm.generate([long_prompt], one)
    seconds = min(timed(lambda: llm.generate([long_prompt], one), device) for _ in range(3))
    figures["prefill_tokens_per_s"] = args.prefill_len / seconds
    return figures


def concurrent_figures(llm: LLM, device: torch.device, count: int, args) -> dict:
    """`count` prompts of args.prompt_len tokens, args.new_tokens new each, through the scheduler:
    output tokens/s end to end and over the decode-only steps."""
    prompts = random_prompts(count, args.prompt_len, seed=2)
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    llm.generate(prompts, params)  # warm-up: CUDA graphs of every batch size this run meets get captured
    with host_step_timers(llm.engine) as host:
        seconds = timed(lambda: llm.generate(prompts, params), device)
    print(f"ours {count} sequences: {count * args.new_tokens / seconds:.0f} output tokens/s end to end, "
          f"{host['decode_tokens_per_s']:.0f} in the decode-only steps", flush=True)
    return {"output_tokens_per_s": count * args.new_tokens / seconds, "seconds": seconds, "host_ms_per_step": host}


def with_dependent_launch(llm: LLM, device: torch.device, args, measure) -> dict:
    """measure() with the plain launches, then with every starchat kernel launched as a
    programmatic dependent (STARCHAT_PDL=1: Hopper and newer; the CUDA graphs captured again with
    those launches), one right after the other; also whether greedy tokens stay those of the plain
    launches. Restores the plain launches and graphs after."""
    if not triton_support.dependent_launch(device, requested=True):
        return {"skipped": "needs a GPU of compute capability 9.0 or newer and a Triton with grid dependency control"}
    prompts = random_prompts(4, args.prompt_len, seed=4)
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    before = [completion.token_ids for completion in llm.generate(prompts, params)]
    plain = measure()
    runner = llm.engine.runner

    def capture_graphs():
        if runner.decode_graphs is not None:
            runner.decode_graphs = None
            runner.enable_static_decode(max(args.concurrent), llm.engine.max_model_len)

    triton_support.PDL_ENABLED = True
    try:
        capture_graphs()
        after = [completion.token_ids for completion in llm.generate(prompts, params)]
        return {"tokens_equal_plain_launches": after == before, "plain": plain, "dependent_launch": measure()}
    finally:
        triton_support.PDL_ENABLED = False
        capture_graphs()


KERNEL_KINDS = (("products (starchat Triton)", ("_weight_product", "_row_product")),
                ("products (cuBLAS)", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "cublas")),
                ("attention", ("_decode_split", "_merge_splits", "flash", "attention", "fmha", "sdpa")),
                ("layer norm", ("layer_norm", "_add_layer_norm", "layernorm")),
                ("sampling", ("softmax", "argmax", "topk", "sort", "multinomial", "exponential", "max")))


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(key.lower() in lowered for key in keys)), "other")


def decode_kernel_profile(llm: LLM, count: int, prompt_len: int, new_tokens: int = 33) -> dict:
    """GPU time per decode step at `count` sequences by kernel kind and the top kernels, from
    PyTorch's profiler (CUPTI records the kernels that CUDA graphs replay): one run with a single
    new token (the prefill alone) subtracted from one with `new_tokens`, over new_tokens - 1 steps."""
    from torch.profiler import ProfilerActivity, profile

    prompts = random_prompts(count, prompt_len, seed=2)

    def kernel_times(tokens: int) -> dict[str, tuple[float, int]]:
        params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
        llm.generate(prompts, params)  # graphs of these batch sizes captured before profiling
        # CPU runs (the pipeline check) profile the host's operators instead
        activity = ProfilerActivity.CUDA if llm.engine.device.type == "cuda" else ProfilerActivity.CPU
        with profile(activities=[activity]) as profiler:
            llm.generate(prompts, params)
        times = {}
        for event in profiler.key_averages():
            microseconds = (event.self_cpu_time_total if activity == ProfilerActivity.CPU
                            else getattr(event, "self_device_time_total", None) or event.self_cuda_time_total)
            if microseconds > 0:
                times[event.key] = (microseconds, event.count)
        return times

    prefill, whole = kernel_times(1), kernel_times(new_tokens)
    steps = new_tokens - 1
    per_step = {name: ((us - prefill.get(name, (0.0, 0))[0]) / steps, (calls - prefill.get(name, (0.0, 0))[1]) / steps)
                for name, (us, calls) in whole.items()}
    kinds: dict[str, float] = {}
    for name, (us, _) in per_step.items():
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + us
    top = sorted(per_step.items(), key=lambda item: -item[1][0])[:25]
    figures = {"sequences": count, "decode_steps": steps, "gpu_ms_per_step": sum(kinds.values()) / 1e3,
               "ms_per_step_by_kind": {kind: us / 1e3 for kind, us in sorted(kinds.items(), key=lambda kv: -kv[1])},
               "top_kernels": [{"name": name[:160], "us_per_step": us, "calls_per_step": calls} for name, (us, calls) in top]}
    print(f"decode step at {count} sequences: {figures['gpu_ms_per_step']:.2f} ms of GPU kernels", flush=True)
    return figures


def verify_step_costs(llm: LLM, device: torch.device, context: int = 256, drafts=(0, 1, 2, 4, 7)) -> dict:
    """What a speculative decode's verify step costs against a plain decode step: one sequence at
    `context` tokens, its last token and k drafts as k + 1 decode rows in the verify steps' own
    CUDA graphs (rows padded to the batch bucket), k = 0 the plain step's graph. Speculation
    gains wherever the accepted drafts per step exceed the extra time; the acceptance itself
    depends on the model and the text, which random weights cannot stand for. Median of 30 replays."""
    runner = llm.engine.runner
    if runner.decode_graphs is None:
        runner.enable_static_decode(8, llm.engine.max_model_len, capture=device.type == "cuda")
    blocks = list(range(-(-(context + max(drafts) + 1) // runner.block_size)))  # any blocks: no request runs
    figures = {}
    for k in drafts:
        rows = k + 1
        token_ids = [7] * rows
        positions = list(range(context, context + rows))

        def step():
            runner.decode_graphs.run(token_ids, positions, [blocks] * rows, rows_share_sequences=k > 0)

        step()
        times = sorted(timed(step, device) for _ in range(30))
        figures[k] = {"rows": rows, "ms": 1e3 * times[len(times) // 2]}
    for k in drafts:
        figures[k]["x_plain_step"] = figures[k]["ms"] / figures[drafts[0]]["ms"]
        print(f"verify step with {k} drafts: {figures[k]['ms']:.2f} ms (x{figures[k]['x_plain_step']:.3f} a plain step)",
              flush=True)
    return figures


def int8_kernel(device: torch.device) -> str:
    """Which product the int8 decode steps run: starchat's Triton kernel, or dequantize + cuBLAS."""
    from starchat.model import triton_linear

    if device.type == "cpu":
        return "native CPU kernels (packed int8)"

    probe = torch.zeros(1, 64, dtype=torch.bfloat16, device=device)
    return "triton" if triton_linear.triton is not None and triton_linear.supports(probe) else "dequantize"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="starchat-beta", choices=sorted(NAMED_SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--new-tokens", type=int, default=128, help="new tokens per sequence of the concurrent runs")
    parser.add_argument("--latency-tokens", type=int, default=128, help="decoded tokens timed at batch 1")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--prefill-len", type=int, default=2048)
    parser.add_argument("--concurrent", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-int8", action="store_true")
    parser.add_argument("--eager", action="store_true", help="also run ours without CUDA graphs")
    parser.add_argument("--quick", action="store_true", help="few tokens, small batches: checks the pipeline")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.latency_tokens, args.prompt_len, args.prefill_len, args.concurrent = 8, 8, 16, 64, [2, 4]
    device = torch.device(args.device)
    results: dict = {"machine": describe_machine(device), "shape": args.shape, "settings": {k: str(v) for k, v in vars(args).items()}}
    bandwidth = measure_read_bandwidth(device, size_mib=2048 if device.type == "cuda" else 256)
    results["copy_bandwidth_gb_per_s"] = bandwidth / 1e9
    print(json.dumps(results, indent=2), flush=True)

    def save():
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as folder:
        model_dir = config_only_model_dir(args.shape, Path(folder) / args.shape)
        stages = [] if args.skip_hf else [("hf", lambda: hf_figures(model_dir, device, args))]
        state: dict = {}

        def load(quantize=None):
            state.pop("llm", None)
            gc.collect()
            if device.type == "cuda":  # the KV cache is sized from the driver's free memory
                torch.cuda.empty_cache()
            started = time.perf_counter()
            state["llm"] = LLM(str(model_dir), dtype="bfloat16" if device.type == "cuda" else "float32", device=str(device),
                               load_format="random", quantize=quantize, progress=False,
                               max_num_seqs=max(args.concurrent), max_num_batched_tokens=4096,
                               enable_prefix_caching=False)  # the prefill figure repeats one prompt
            results.setdefault("load_seconds", {})[quantize or "bf16"] = time.perf_counter() - started
            weight_bytes = weight_bytes_read_per_token(state["llm"].engine.runner.model)
            results.setdefault("weight_bytes_per_token", {})[quantize or "bf16"] = weight_bytes
            results.setdefault("floor_ms_per_token", {})[quantize or "bf16"] = 1e3 * weight_bytes / bandwidth

        def ours(graphs: bool = True, triton_kernels: bool = True):
            if "llm" not in state or triton_support.ENABLED != triton_kernels:
                triton_support.ENABLED = triton_kernels
                load()
            runner = state["llm"].engine.runner
            if graphs and runner.decode_graphs is None and device.type == "cuda":
                runner.enable_static_decode(max(args.concurrent), state["llm"].engine.max_model_len)
            if not graphs:
                runner.decode_graphs = None
            return ours_figures(state["llm"], device, args)

        # The same-run baseline of starchat's Triton decode-attention and add+LayerNorm kernels:
        # the same CUDA-graph steps through PyTorch's kernels (STARCHAT_TRITON_KERNELS=0).
        stages += [("ours_cuda_graphs", ours),
                   ("decode_profile", lambda: {count: decode_kernel_profile(state["llm"], count, args.prompt_len)
                                               for count in (1, max(args.concurrent))}),
                   ("verify_steps", lambda: verify_step_costs(state["llm"], device)),
                   # STARCHAT_PDL=1 against the plain launches above (batch 1 and the largest batch)
                   ("ours_dependent_launch", lambda: with_dependent_launch(state["llm"], device, args, lambda: {
                       "latency": ours_latency(state["llm"], args.latency_tokens, args.prompt_len).as_dict(),
                       "concurrent": {max(args.concurrent): concurrent_figures(state["llm"], device, max(args.concurrent),
                                                                               args)}}))]
        if not args.skip_int8:
            def int8():
                triton_support.ENABLED = True
                results["int8_kernel"] = int8_kernel(device)
                load("int8")
                llm = state["llm"]
                if device.type == "cuda":
                    llm.engine.runner.enable_static_decode(max(args.concurrent), llm.engine.max_model_len)
                return {"decode_products": [{**row, "shape": list(row["shape"]), "blocks": list(row["blocks"])}
                                            for row in llm.engine.runner.decode_products],
                        "latency": ours_latency(llm, args.latency_tokens, args.prompt_len).as_dict(),
                        "decode_profile_batch_1": decode_kernel_profile(llm, 1, args.prompt_len),
                        # int8 products of up to 128 rows read int8 (before session 23: dequantized past 64)
                        "concurrent": {max(args.concurrent): concurrent_figures(llm, device, max(args.concurrent), args)},
                        "dependent_launch": with_dependent_launch(llm, device, args, lambda: {
                            "latency": ours_latency(llm, args.latency_tokens, args.prompt_len).as_dict()})}
            stages.append(("ours_int8", int8))
        # last: the same-run baseline of the Triton kernels (a time limit cuts it first)
        stages.append(("ours_graphs_pytorch_kernels", lambda: ours(triton_kernels=False)))
        if args.eager:
            stages.append(("ours_eager", lambda: ours(graphs=False)))
        for name, stage in stages:
            print(f"--- {name}", flush=True)
            try:
                results[name] = stage()
            except Exception as error:  # one failed stage must not lose the others' figures
                traceback.print_exc()
                results[name] = {"error": f"{type(error).__name__}: {error}"}
            print(json.dumps({name: results[name]}, indent=2), flush=True)
            save()
    save()


if __name__ == "__main__":
    main()
