"""The benchmarks' bookkeeping: sides measured in turns, medians, per-round ratios, and `starchat bench latency`."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

from starchat.bench.offline import LatencyResult, interleave, median_latency, round_ratios


def test_interleave_takes_every_side_once_per_round_in_turns():
    calls = []

    def side(name):
        def measure():
            calls.append(name)
            return len(calls)
        return measure

    results = interleave({"ours": side("ours"), "hf": side("hf"), "llama.cpp": side("llama.cpp")}, rounds=3)
    assert calls == ["ours", "hf", "llama.cpp"] * 3
    assert results == {"ours": [1, 4, 7], "hf": [2, 5, 8], "llama.cpp": [3, 6, 9]}
    with pytest.raises(ValueError, match="rounds"):
        interleave({"ours": side("ours")}, rounds=0)


def test_median_latency_is_each_figures_median_and_ratios_pair_rounds():
    rounds = [LatencyResult(10.0, 100.0, 300.0, 1000, 0.1), LatencyResult(30.0, 33.3, 100.0, 1000, 0.03),
              LatencyResult(20.0, 50.0, 200.0, 1000, 0.05)]
    assert median_latency(rounds) == LatencyResult(20.0, 50.0, 200.0, 1000, 0.05)
    assert round_ratios([100.0, 50.0], [50.0, 50.0]) == [2.0, 1.0]
    with pytest.raises(ValueError):
        round_ratios([1.0], [1.0, 2.0])


def test_bench_latency_against_hf_in_turns(tiny_model_dir, tmp_path):
    output = tmp_path / "latency.json"
    result = subprocess.run([sys.executable, "-m", "starchat.cli.main", "bench", "latency", "--model", str(tiny_model_dir),
                             "--dtype", "float32", "--device", "cpu", "--new-tokens", "4", "--prompt-len", "8", "--hf",
                             "--rounds", "2", "--json", str(output)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "per round (taken in turns)" in result.stdout
    figures = json.loads(output.read_text())
    assert len(figures["rounds"]["ours"]) == len(figures["rounds"]["hf"]) == 2
    # the machine says which product kernels ran (the AMX tiles change CPU figures several-fold)
    from starchat.model import cpu_linear, native
    assert figures["machine"]["native_kernels"] == native.available()
    assert figures["machine"]["amx_tiles"] == (native.available() and cpu_linear.native_amx_tiles())
    ratios = figures["ours_vs_hf_tokens_per_s_rounds"]
    assert ratios == pytest.approx([o["tokens_per_s"] / h["tokens_per_s"]
                                    for o, h in zip(figures["rounds"]["ours"], figures["rounds"]["hf"])])
    assert figures["ours"]["tokens_per_s"] == pytest.approx(statistics.median(r["tokens_per_s"] for r in figures["rounds"]["ours"]))
    assert figures["hf"]["weight_bytes_per_token"] > 0


def test_bench_throughput_runs_at_most_max_concurrent_requests(tiny_model_dir, tmp_path):
    output = tmp_path / "throughput.json"
    command = [sys.executable, "-m", "starchat.cli.main", "bench", "throughput", "--model", str(tiny_model_dir),
               "--dtype", "float32", "--device", "cpu", "--num-prompts", "5", "--prompt-len", "8", "--new-tokens", "3",
               "--json", str(output)]
    result = subprocess.run(command + ["--max-concurrent", "2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(output.read_text())["ours"]
    assert figures["max_concurrent"] == 2 and figures["output_tokens_per_s"] > 0
    refused = subprocess.run(command + ["--max-concurrent", "0"], capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "max-concurrent" in refused.stderr


def test_host_step_timers_count_steps_and_restore_the_engine(tiny_model_dir):
    from starchat import LLM, SamplingParams
    from starchat.bench.offline import host_step_timers

    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False)
    engine = llm.engine
    with host_step_timers(engine) as host:
        llm.generate(["def f():", "x = 1"], SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert host["steps"] >= 5  # a prefill step, then a step per further token
    assert host["step_ms"] > host["schedule_ms"] > 0 and host["step_ms"] > host["outputs_ms"] > 0
    # Both prompts are prefilled in the first step; each later step decodes both (4 more tokens each)
    assert host["decode_steps"] == host["steps"] - 1 == 4 and host["decode_tokens"] == 8
    assert host["decode_tokens_per_s"] > 0
    assert "step" not in vars(engine) and "schedule" not in vars(engine.scheduler)  # the methods are back
    with host_step_timers(engine) as again:
        pass
    assert again["steps"] == 0


def test_ctranslate2_baseline_decodes_hf_greedy_tokens(tiny_model_dir, tmp_path):
    """The CTranslate2 baseline must decode what HF does (same model, same prompt ids), or its
    speed would not be comparable with ours."""
    pytest.importorskip("ctranslate2")
    import torch
    from transformers import GPTBigCodeForCausalLM as HFModel

    from starchat.bench.ctranslate2_baseline import CTranslate2Baseline, convert_to_ctranslate2
    from starchat.bench.offline import random_prompts
    from test_engine_reference import hf_greedy

    converted = convert_to_ctranslate2(tiny_model_dir, "float32", tmp_path)
    assert convert_to_ctranslate2(tiny_model_dir, "float32", tmp_path) == converted  # cached
    baseline = CTranslate2Baseline(converted, threads=2, compute_type="float32")
    reference = HFModel.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts = random_prompts(3, 12, seed=5)
    assert baseline.generate(prompts, 10) == [hf_greedy(reference, prompt, 10) for prompt in prompts]
    assert baseline.throughput(2, 8, 4).output_tokens_per_s > 0
    assert baseline.latency(4, 8, weight_bytes=1).tokens_per_s > 0
    # A type this CPU has no kernels for (bfloat16 without AVX-512 BF16) runs in float32, and says so.
    assert CTranslate2Baseline(converted, threads=2, compute_type="bfloat16").compute_type in ("bfloat16", "float32")


def test_quality_comparison_of_a_model_with_itself_and_hf_perplexity(tiny_model_dir):
    """bench/int8_quality.py's measures: a model against itself agrees everywhere, and its
    perplexity is HF transformers' exp(loss) on the same windows."""
    import math

    import torch
    from transformers import GPTBigCodeForCausalLM as HFModel

    from starchat import LLM
    from starchat.bench.quality import compare

    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False)
    generator = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 49152, (40,), generator=generator).tolist() for _ in range(3)]
    same = compare(llm, llm, windows, prompt_tokens=8, new_tokens=6)
    assert (same.perplexity_ratio, same.mean_kl, same.max_relative_drift, same.top1_agreement) == (1.0, 0.0, 0.0, 1.0)
    assert (same.greedy_identical, same.greedy_common_prefix, same.scored_tokens) == (1.0, 6.0, 3 * 39)
    hf = HFModel.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item() for ids in windows]
    assert same.reference_perplexity == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-4)

    int8 = LLM(str(tiny_model_dir), dtype="float32", device="cpu", quantize="int8", progress=False)
    drifted = compare(llm, int8, windows, prompt_tokens=8, new_tokens=6)
    assert 0 < drifted.mean_kl and 0 < drifted.max_relative_drift < 0.2
    assert drifted.candidate_perplexity != drifted.reference_perplexity == same.reference_perplexity
    assert 0 <= drifted.greedy_common_prefix <= 6 and 0 <= drifted.greedy_identical <= 1


def test_prefix_cache_scenarios_reuse_the_conversation_and_the_system_prompt(tiny_model_dir):
    from starchat.bench.offline import random_prompts
    from starchat.bench.prefix_cache import chat, shared_prefix
    from starchat.config import EngineConfig
    from starchat.engine.engine import LLMEngine

    system = random_prompts(1, 40, seed=1)[0]
    turns = random_prompts(3, 10, seed=2)
    questions = random_prompts(4, 10, seed=3)
    results = {}
    for caching in (True, False):
        engine = LLMEngine(EngineConfig(model=str(tiny_model_dir), dtype="float32", device="cpu",
                                        enable_prefix_caching=caching), progress=False)
        cold = shared_prefix(engine, random_prompts(1, 40, seed=4)[0], questions, 6, warm=False)
        results[caching] = (chat(engine, system, turns, reply_tokens=6), shared_prefix(engine, system, questions, 6), cold)
    for on, off in zip(*results.values()):
        assert [r.prompt_tokens for r in on.requests] == [r.prompt_tokens for r in off.requests]
        assert off.cached_tokens == 0 and all(0 < r.time_to_first_token <= r.total for r in on.requests)
    (chat_on, burst_on, cold_on), _ = results.values()
    # Turn k's prompt holds turn k-1's prompt and reply: its computed whole blocks are found.
    assert [r.prompt_tokens for r in chat_on.requests] == [50, 66, 82]
    assert [r.cached_tokens for r in chat_on.requests] == [0, 48, 64]  # (50 + 6 - 1) // 16 * 16, ...
    assert [r.cached_tokens for r in burst_on.requests] == [32] * 4  # the warm-up's two full blocks
    assert [r.cached_tokens for r in cold_on.requests] == [0, 32, 32, 32]  # the first one's, in the same step


def test_speed_benchmarks_compute_every_prompt_token(tiny_model_dir):
    """`starchat bench` measures computing prompts, as its baselines do: a prompt it repeats (the
    time-to-first-token figure does) must not be found in the prefix cache."""
    from starchat.cli.bench import _setup
    from starchat.sampling_params import SamplingParams

    _, llm, _ = _setup(str(tiny_model_dir), "tiny_starcoder", "float32", "cpu", None, 4, prompt_len=100, new_tokens=1)
    prompt = list(range(1000, 1100))
    first, second = (llm.generate([prompt], SamplingParams(max_new_tokens=1))[0] for _ in range(2))
    assert first.num_cached_tokens == second.num_cached_tokens == 0


def test_concurrent_workload_draws_lengths_around_the_given_ones(tiny_model_dir):
    from starchat import LLM
    from starchat.bench.offline import concurrent_workload, ours_throughput, random_prompts

    prompts, counts = concurrent_workload(4, 12, 5)
    assert prompts == random_prompts(4, 12, seed=2) and counts == [5] * 4  # ratio 0: the runs of before
    prompts, counts = concurrent_workload(200, 40, 10, range_ratio=0.5)
    assert {len(prompt) for prompt in prompts} <= set(range(20, 61)) and len({len(prompt) for prompt in prompts}) > 20
    assert set(counts) <= set(range(5, 16)) and len(set(counts)) > 5
    assert concurrent_workload(200, 40, 10, range_ratio=0.5) == (prompts, counts)  # every engine gets the same
    assert all(19 <= token < 49152 for prompt in prompts for token in prompt)
    # ours generates every request's own count: the rate times the time is their sum
    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False)
    result = ours_throughput(llm, 6, 10, 4, range_ratio=0.5)
    assert result.output_tokens_per_s * result.seconds == pytest.approx(sum(concurrent_workload(6, 10, 4, 0.5)[1]))


def test_large_model_bench_loads_each_side_in_a_process_of_its_own_per_round(tiny_model_dir, tmp_path):
    output = tmp_path / "large.json"
    result = subprocess.run([sys.executable, "bench/cpu_large_model.py", "--model-dir", str(tiny_model_dir), "--rounds", "2",
                             "--new-tokens", "2", "--prompt-len", "8", "--concurrent", "2", "--json", str(output)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    figures = json.loads(output.read_text())
    rounds = figures["rounds"]["ours"]
    assert len(rounds) == 2 and rounds[0]["process"] != rounds[1]["process"]  # a fresh process every round
    assert all(r["peak_rss_gib"] > 0 and r["load_s"] > 0 and r["throughput"]["num_prompts"] == 2 for r in rounds)
    assert figures["summary"]["medians"]["ours"]["batch-1 tokens/s"] == pytest.approx(
        statistics.median(r["latency"]["tokens_per_s"] for r in rounds))
    assert "ours_vs_llamacpp" not in figures["summary"]  # llama.cpp only where a GGUF was given


def test_large_model_bench_ratios_favour_ours_above_one_for_rates_and_times():
    sys.path.insert(0, "bench")
    try:
        from cpu_large_model import summarize
    finally:
        sys.path.remove("bench")

    def side(tokens_per_s, ttft_ms, concurrent):
        return {"load_s": 1.0, "peak_rss_gib": 1.0, "throughput": {"output_tokens_per_s": concurrent},
                "latency": {"tokens_per_s": tokens_per_s, "ms_per_token": 1e3 / tokens_per_s, "achieved_gb_per_s": 1.0,
                            "ttft_ms": ttft_ms}}

    summary = summarize({"ours": [side(2.0, 100.0, 8.0), side(3.0, 200.0, 9.0)],
                         "llama.cpp": [side(1.0, 400.0, 4.0), side(2.0, 300.0, 3.0)]})
    ratios = summary["ours_vs_llamacpp"]
    assert ratios["batch-1 tokens/s"]["rounds"] == [2.0, 1.5]
    assert ratios["first token, ms"]["rounds"] == [4.0, 1.5]  # theirs / ours: ours took less time
    assert ratios["concurrent, output tokens/s"]["median"] == pytest.approx(2.5)
    assert summary["medians"]["ours"]["first token, ms"] == 150.0


def test_restart_bench_starts_each_folder_twice_per_round_in_fresh_processes(tiny_model_dir, tmp_path):
    """bench/restart.py: a cold start and a restart per folder and round, each its own process;
    a panels folder's weights counted as file-backed memory (mapped), a rows folder's as the
    process's own."""
    from starchat.model import native
    from starchat.model.quantized_checkpoint import write_quantized_checkpoint

    panels = write_quantized_checkpoint(tiny_model_dir, tmp_path / "panels", progress=False)
    rows = write_quantized_checkpoint(tiny_model_dir, tmp_path / "rows", progress=False, layout="rows")
    output = tmp_path / "restart.json"
    result = subprocess.run([sys.executable, "bench/restart.py", "--model-dirs", str(panels), str(rows), "--rounds", "1",
                             # ms/token is a difference of two timings: 2 tokens' worth sank below a loaded CI
                             # host's noise once (a negative figure); 16 keep it well above
                             "--new-tokens", "16", "--json", str(output)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    figures = json.loads(output.read_text())
    assert not figures["caches_dropped"]
    for folder in (panels, rows):
        runs = figures["runs"][str(folder)]
        assert [run["start"] for run in runs] == ["cold", "restart"]
        assert all(run["first_token_s"] >= run["load_s"] > 0 and run["ms_per_token"] > 0 for run in runs)
    assert set(figures["medians"]) == {"panels (panels), cold", "panels (panels), restart", "rows (rows), cold", "rows (rows), restart"}
    if native.available():  # mapped: the int8 weights (about 0.16 GiB here) are file-backed in the panels' processes
        weights_gib = sum(f.stat().st_size for f in panels.glob("*.safetensors")) / 2**30
        file_backed = {name: figures["medians"][name]["rss_file_gib"] for name in figures["medians"]}
        assert file_backed["panels (panels), cold"] > file_backed["rows (rows), cold"] + 0.5 * weights_gib


def test_sampler_bench_times_both_sides_for_every_parameter_set(tmp_path):
    output = tmp_path / "sampler.json"
    result = subprocess.run([sys.executable, "bench/sampler.py", "--rows", "1", "3", "--repeats", "1", "--json", str(output)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(output.read_text())
    assert figures["machine"]["cpu_count"] >= 1
    rows = figures["figures"]
    assert len(rows) == 2 * 3 and {row["rows"] for row in rows} == {1, 3}
    assert all(row["starchat_ms"] > 0 and row["hf_over_starchat"] == pytest.approx(row["hf_ms"] / row["starchat_ms"])
               for row in rows)
