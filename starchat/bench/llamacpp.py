"""llama.cpp (through llama-cpp-python) as an optional CPU baseline, measured in the same run as ours.

Setup, once (it is not a dependency of starchat):
    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python    # built here, for this CPU
    pip download llama-cpp-python --no-binary :all: --no-deps       # its source archive carries
    # vendor/llama.cpp/convert_hf_to_gguf.py (with conversion/ and gguf-py/ beside it)

On a CPU with AMX, 0.3.36's AMX int8 path crashed decoding q8_0 models (a segmentation fault in
llama_decode, on a 2-core Xeon VM); building without it runs them, and its 16-bit code is the same:
    CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' \
        -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'" pip install llama-cpp-python

The checkpoint is converted from its Hugging Face folder to GGUF at the asked type (f32, f16,
bf16, q8_0), then decoded greedily with the same prompts as our engine: batch-1 ms/token over
the new tokens after the first, time to first token of a long prompt, and output tokens/s of N
concurrent sequences (llama.cpp's batch API: each prompt prefilled, then one decode per step
for all sequences together, one KV sequence per request as ANCHORS.md advises).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from starchat.bench.checkpoints import tokenizer_within_vocab
from starchat.bench.offline import LatencyResult, ThroughputResult, concurrent_workload, whole_sequence_latency


def convert_to_gguf(model_dir: Path, outtype: str, converter: Path, output_dir: Path) -> Path:
    """model_dir (HF layout) -> output_dir/<name>-<outtype>.gguf with llama.cpp's own converter (cached)."""
    output = output_dir / f"{model_dir.name}-{outtype}.gguf"
    if not output.is_file():
        output_dir.mkdir(parents=True, exist_ok=True)
        source = tokenizer_within_vocab(model_dir, output_dir)
        env = dict(os.environ, PYTHONPATH=str(converter.parent / "gguf-py"))
        done = subprocess.run([sys.executable, str(converter), str(source), "--outtype", outtype, "--outfile", str(output)],
                              env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{converter.name} failed for {outtype}: {done.stderr.strip().splitlines()[-1:]}")
    return output


class LlamaCppBaseline:
    def __init__(self, gguf: Path, threads: int, context: int = 2048):
        from llama_cpp import Llama

        self.gguf = gguf
        self.threads = threads
        self.llm = Llama(model_path=str(gguf), n_ctx=context, n_threads=threads, n_threads_batch=threads,
                         n_batch=512, verbose=False)

    def _greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        # A cleared cache first: llama-cpp-python would otherwise reuse a cached prompt prefix.
        self.llm.reset()
        tokens = []
        for token in self.llm.generate(prompt, temp=0.0, top_k=1, reset=False):
            tokens.append(token)
            if len(tokens) >= new_tokens:
                break
        return tokens

    def latency(self, new_tokens: int, prompt_len: int, weight_bytes: int, repeats: int = 3) -> LatencyResult:
        return whole_sequence_latency(self._greedy, new_tokens, prompt_len, weight_bytes, repeats)

    def first_tokens(self, prompt: list[int], count: int) -> list[int]:
        return self._greedy(prompt, count)

    def throughput(self, num_prompts: int, prompt_len: int, new_tokens: int, range_ratio: float = 0.0) -> ThroughputResult:
        """End to end (prefill included), greedy, like `offline.ours_throughput`, over the same
        workload (`offline.concurrent_workload`): each prompt prefilled, then every unfinished
        sequence decoded one token a step in one batch."""
        import llama_cpp
        import numpy as np

        prompts, counts = concurrent_workload(num_prompts, prompt_len, new_tokens, range_ratio)
        longest = max(len(prompt) + count for prompt, count in zip(prompts, counts))
        params = llama_cpp.llama_context_default_params()
        params.n_seq_max = num_prompts
        params.n_ctx = num_prompts * (longest + 8)  # split per sequence (kv_unified off)
        params.n_batch = params.n_ubatch = max(512, num_prompts, max(map(len, prompts)))  # a prompt goes in one batch
        params.n_threads = params.n_threads_batch = self.threads
        params.kv_unified = False
        context = llama_cpp.llama_init_from_model(self.llm._model.model, params)
        if not context:
            raise RuntimeError("llama.cpp could not create a batched context")
        batch = llama_cpp.llama_batch_init(max(max(map(len, prompts)), num_prompts), 0, 1)
        vocab = self.llm.n_vocab()

        def run(entries: list[tuple[int, int, int, bool]]) -> list[int]:
            """entries (token, position, sequence, wants logits) -> greedy next tokens of the flagged ones."""
            for index, (token, position, sequence, wants) in enumerate(entries):
                batch.token[index], batch.pos[index] = token, position
                batch.n_seq_id[index], batch.seq_id[index][0], batch.logits[index] = 1, sequence, int(wants)
            batch.n_tokens = len(entries)
            if llama_cpp.llama_decode(context, batch) != 0:
                raise RuntimeError("llama_decode failed")
            rows = [index for index, entry in enumerate(entries) if entry[3]]
            return [int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(context, row), shape=(vocab,))))
                    for row in rows]

        try:
            start = time.perf_counter()
            last = [run([(token, position, sequence, position == len(prompt) - 1) for position, token in enumerate(prompt)])[0]
                    for sequence, prompt in enumerate(prompts)]
            made = [1] * num_prompts  # the prompt's step gave each its first token
            while True:
                active = [sequence for sequence in range(num_prompts) if made[sequence] < counts[sequence]]
                if not active:
                    break
                tokens = run([(last[sequence], len(prompts[sequence]) + made[sequence] - 1, sequence, True)
                              for sequence in active])
                for sequence, token in zip(active, tokens):
                    last[sequence] = token
                    made[sequence] += 1
            seconds = time.perf_counter() - start
        finally:
            llama_cpp.llama_batch_free(batch)
            llama_cpp.llama_free(context)
        return ThroughputResult(num_prompts, sum(counts) / seconds, seconds)
