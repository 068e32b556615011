"""Our engine against HF transformers' GPTBigCodeForCausalLM (the reference), float32 on CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import GPTBigCodeForCausalLM as HFModel

from reference_checkpoints import hf_greedy, write_hf_checkpoint
from starchat import LLM, SamplingParams
from starchat.model import AttentionMetadata, PrefillChunk

PROMPTS = [
    "def fibonacci(n):",
    "import numpy as np\n\nclass Matrix:\n    def __init__(self, rows, cols):\n        self.rows = rows\n",
    "x",
    "# Sort a list of dictionaries by the value of one key, in place, with a stable sort " * 4,
]

CONFIGS = {
    "mqa-tanh": dict(multi_query=True, activation_function="gelu_pytorch_tanh"),
    "mha-erf": dict(multi_query=False, activation_function="gelu"),
    "mqa-erf-untied": dict(multi_query=True, activation_function="gelu", tie_word_embeddings=False, n_layer=3),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    path = write_hf_checkpoint(tmp_path_factory.mktemp(request.param), seed=7, **CONFIGS[request.param])
    reference = HFModel.from_pretrained(path, dtype=torch.float32).eval()
    ours = LLM(str(path), dtype="float32", device="cpu", progress=False)
    return reference, ours


def our_prompt_logits(llm: LLM, prompt_ids: list[int]) -> torch.Tensor:
    """Logits at every prompt position through our one forward path (a single prefill chunk)."""
    runner = llm.engine.runner
    n = len(prompt_ids)
    metadata = AttentionMetadata(slot_mapping=torch.arange(n), num_decode_tokens=0, decode_gather_slots=None,
                                 decode_mask=None, prefill_chunks=[PrefillChunk(0, n, 0, None)])
    hidden = runner.model(torch.tensor(prompt_ids), torch.arange(n), metadata, runner.kv_cache)
    return runner.model.compute_logits(hidden)


def test_prompt_logits_match_hf(checkpoint):
    reference, ours = checkpoint
    for prompt in PROMPTS:
        ids = ours.tokenizer.encode(prompt)
        with torch.no_grad():
            expected = reference(torch.tensor([ids])).logits[0].float()
        actual = our_prompt_logits(ours, ids)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_greedy_tokens_and_logprobs_match_hf(checkpoint):
    reference, ours = checkpoint
    new_tokens = 40
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, logprobs=0)
    completions = ours.generate(PROMPTS, params)
    for prompt, completion in zip(PROMPTS, completions):
        ids = ours.tokenizer.encode(prompt)
        expected = hf_greedy(reference, ids, new_tokens)
        assert completion.token_ids == expected, prompt
        assert completion.finish_reason == "length"
        # The chosen token's log-probability equals HF's log-softmax at each step.
        with torch.no_grad():
            logits = reference(torch.tensor([ids + expected])).logits[0, len(ids) - 1:-1].float()
        hf_logprobs = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(expected)[:, None]).squeeze(1)
        ours_logprobs = torch.tensor([lp.logprob for lp in completion.logprobs])
        torch.testing.assert_close(ours_logprobs, hf_logprobs, rtol=1e-4, atol=1e-4)


def test_prompt_logprobs_match_hf_in_one_chunk_and_in_many(checkpoint, tmp_path):
    """Every prompt token's log-probability given the tokens before it, and the top alternatives,
    equal HF's log-softmax at the position before; a prompt computed in 16-token chunks (each
    chunk's last row scores the next chunk's first token) gives the same."""
    reference, ours = checkpoint
    chunked = LLM(ours.engine.config.model, dtype="float32", device="cpu", progress=False, max_num_batched_tokens=16)
    params = SamplingParams(max_new_tokens=2, ignore_eos=True, prompt_logprobs=3)
    prompts = [ours.tokenizer.encode(prompt) for prompt in PROMPTS]
    for llm in (ours, chunked):
        completions = llm.generate(prompts, params)
        for ids, completion in zip(prompts, completions):
            with torch.no_grad():
                hf = torch.log_softmax(reference(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)  # rows 0..n-2
            scored = completion.prompt_logprobs
            assert len(scored) == len(ids) and scored[0] is None
            assert [entry.token_id for entry in scored[1:]] == ids[1:]
            expected = hf.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
            torch.testing.assert_close(torch.tensor([entry.logprob for entry in scored[1:]]), expected,
                                       rtol=1e-4, atol=1e-4)
            top_values, top_ids = hf.topk(3, dim=-1)
            assert [[t for t, _, _ in entry.top] for entry in scored[1:]] == top_ids.tolist()
            ours_top = torch.tensor([[lp for _, _, lp in entry.top] for entry in scored[1:]]).reshape(-1, 3)
            torch.testing.assert_close(ours_top, top_values, rtol=1e-4, atol=1e-4)
            assert completion.token_ids == hf_greedy(reference, ids, 2)  # generation goes on as usual


def _reshard(source_dir, target_dir, kind: str) -> None:
    """Rewrite a checkpoint as two shards plus an index: `.bin` (torch.save) or `.safetensors`."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    target_dir.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(source_dir / name, target_dir / name)
    state = load_file(source_dir / "model.safetensors")
    names = sorted(state)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, half in enumerate(halves):
        file_name = f"{'pytorch_model' if kind == 'bin' else 'model'}-0000{i + 1}-of-00002.{kind}"
        shard = {n: state[n].contiguous() for n in half}
        torch.save(shard, target_dir / file_name) if kind == "bin" else save_file(shard, target_dir / file_name)
        weight_map.update({n: file_name for n in half})
    index_name = "pytorch_model.bin.index.json" if kind == "bin" else "model.safetensors.index.json"
    (target_dir / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("kind", ["bin", "safetensors"])
def test_sharded_checkpoints_load_like_a_single_file(tmp_path, kind):
    single = write_hf_checkpoint(tmp_path / "single", seed=3)
    _reshard(single, tmp_path / "sharded", kind)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    a = LLM(str(single), dtype="float32", progress=False).generate(PROMPTS[:2], params)
    b = LLM(str(tmp_path / "sharded"), dtype="float32", progress=False).generate(PROMPTS[:2], params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


def test_bfloat16_stays_close_to_float32(tiny_model_dir):
    """Measured: bf16 logits within 3% of the largest fp32 logit and the same argmax at the prompt end."""
    fp32 = LLM(str(tiny_model_dir), dtype="float32", progress=False)
    bf16 = LLM(str(tiny_model_dir), dtype="bfloat16", progress=False)
    for prompt in PROMPTS:
        ids = fp32.tokenizer.encode(prompt)
        a, b = our_prompt_logits(fp32, ids), our_prompt_logits(bf16, ids)
        assert (a - b).abs().max().item() <= 0.03 * a.abs().max().item()
    first = SamplingParams(max_new_tokens=4, ignore_eos=True)
    agree = sum(x.token_ids[0] == y.token_ids[0] for x, y in zip(fp32.generate(PROMPTS, first), bf16.generate(PROMPTS, first)))
    assert agree >= len(PROMPTS) - 1


def test_ids_of_a_padded_vocabulary_beyond_the_tokenizer_decode_to_no_text(tmp_path):
    """A model whose vocabulary is padded past the tokenizer's (here 50,000 rows against 49,156
    tokens) may generate, or be prompted with, an id that has no text: generation goes on, and
    the text is HF's decode of the ids (which gives such ids no text)."""
    from transformers import AutoTokenizer

    path = write_hf_checkpoint(tmp_path / "padded", seed=8, vocab_size=50_000)
    reference = HFModel.from_pretrained(path, dtype=torch.float32).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(path)
    ours = LLM(str(path), dtype="float32", device="cpu", progress=False)
    prompt = ours.tokenizer.encode("def add(a, b):") + [49_935]
    forced = SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=2, prompt_logprobs=1,
                            logit_bias={49_990: 100.0})
    plain = SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=1)
    forced_out, plain_out = ours.generate([prompt], forced)[0], ours.generate([prompt], plain)[0]
    assert forced_out.token_ids == [49_990] * 6
    assert forced_out.text == hf_tokenizer.decode(forced_out.token_ids) == ""
    assert [lp.token_id for lp in forced_out.logprobs] == [49_990] * 6
    assert forced_out.prompt_logprobs[-1].token_id == 49_935
    assert plain_out.token_ids == hf_greedy(reference, prompt, 12)
    assert plain_out.text == hf_tokenizer.decode(plain_out.token_ids)
