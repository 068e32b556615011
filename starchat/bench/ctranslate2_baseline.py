"""CTranslate2 as an optional baseline, measured in the same run as ours (`pip install ctranslate2`,
or the `bench` extra; it is not a dependency of starchat).

The checkpoint is converted from its Hugging Face folder with CTranslate2's own converter at the
asked weight type (float32, bfloat16, int8...), then decoded greedily with the same prompt ids as
our engine: batch-1 ms/token over the new tokens after the first, time to first token of a long
prompt, and output tokens/s of N concurrent sequences (`generate_batch` over all of them: a
static batch, as HF's baseline). Generation ignores the end token, as ours does in benchmarks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from starchat.bench.checkpoints import tokenizer_within_vocab
from starchat.bench.offline import LatencyResult, ThroughputResult, random_prompts, whole_sequence_latency

# Our dtype names -> CTranslate2's weight (and compute) types; int8 keeps its activations in float32 on a CPU.
CT2_TYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "int8": "int8_float32"}


def convert_to_ctranslate2(model_dir: Path, quantization: str, output_dir: Path) -> Path:
    """model_dir (HF layout) -> output_dir/<name>-ct2-<quantization> (cached)."""
    from ctranslate2.converters import TransformersConverter

    output = output_dir / f"{model_dir.name}-ct2-{quantization}"
    if not (output / "model.bin").is_file():
        output_dir.mkdir(parents=True, exist_ok=True)
        source = tokenizer_within_vocab(model_dir, output_dir)
        TransformersConverter(str(source)).convert(str(output), quantization=quantization, force=True)
    return output


class CTranslate2Baseline:
    def __init__(self, model_path: Path, threads: int, compute_type: str):
        import ctranslate2

        try:
            self.generator = ctranslate2.Generator(str(model_path), device="cpu", compute_type=compute_type,
                                                   intra_threads=threads)
        except ValueError:  # no kernels for this type on this CPU (bfloat16 without AVX-512 BF16): float32
            self.generator = ctranslate2.Generator(str(model_path), device="cpu", compute_type="float32",
                                                   intra_threads=threads)
        self.compute_type = self.generator.compute_type  # what it runs: the printed label
        self._vocabulary = json.loads((model_path / "vocabulary.json").read_text())

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Greedy token ids, exactly `new_tokens` per prompt (the end token does not stop them)."""
        results = self.generator.generate_batch(
            [[self._vocabulary[token] for token in prompt] for prompt in prompts], max_batch_size=len(prompts),
            max_length=new_tokens, min_length=new_tokens, sampling_topk=1, include_prompt_in_result=False, end_token=[])
        return [result.sequences_ids[0] for result in results]

    def latency(self, new_tokens: int, prompt_len: int, weight_bytes: int, repeats: int = 3) -> LatencyResult:
        return whole_sequence_latency(lambda prompt, count: self.generate([prompt], count), new_tokens, prompt_len,
                                      weight_bytes, repeats)

    def throughput(self, num_prompts: int, prompt_len: int, new_tokens: int) -> ThroughputResult:
        """End to end (prefill included), greedy, like `offline.ours_throughput`."""
        prompts = random_prompts(num_prompts, prompt_len, seed=2)
        start = time.perf_counter()
        self.generate(prompts, new_tokens)
        seconds = time.perf_counter() - start
        return ThroughputResult(num_prompts, num_prompts * new_tokens / seconds, seconds)
