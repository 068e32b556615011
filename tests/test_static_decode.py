"""The fixed-shape decode step that CUDA graphs replay, run without capture on CPU.

Padding rows, padded block tables and context buckets must not change a single greedy token:
the static path is compared with the eager path, which test_engine_reference checks against HF.
"""

from __future__ import annotations

from starchat import LLM, SamplingParams

PROMPTS = ["def add(a, b):", "x", "class Stack:\n    def __init__(self):\n        self.items = []\n" * 3,
           "import os\nimport sys\n"]


def greedy(llm: LLM, prompts: list[str], new_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    return [completion.token_ids for completion in llm.generate(prompts, params)]


def test_static_decode_matches_eager(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False, max_num_seqs=8)
    expected = greedy(llm, PROMPTS, 40)  # contexts cross the 64-token bucket edge
    llm.engine.runner.enable_static_decode(max_batch=8, max_context=llm.engine.max_model_len, capture=False)
    assert greedy(llm, PROMPTS, 40) == expected  # 4 sequences: no padding rows
    assert greedy(llm, PROMPTS[:3], 40) == expected[:3]  # 3 sequences padded to a batch of 4
    assert [greedy(llm, [prompt], 40)[0] for prompt in PROMPTS] == expected
    graphs = llm.engine.runner.decode_graphs
    assert {(4, 64, False), (4, 128, False), (1, 64, False), (1, 128, False)} <= set(graphs.steps)


def test_static_decode_with_mha_and_sampling(tiny_mha_model_dir):
    llm = LLM(str(tiny_mha_model_dir), dtype="float32", device="cpu", progress=False, max_num_seqs=4)
    params = SamplingParams(max_new_tokens=24, do_sample=True, temperature=0.8, top_k=40, seed=3, ignore_eos=True)
    expected = [c.token_ids for c in llm.generate(PROMPTS, params)]
    llm.engine.runner.enable_static_decode(max_batch=4, max_context=llm.engine.max_model_len, capture=False)
    assert [c.token_ids for c in llm.generate(PROMPTS, params)] == expected


def test_static_decode_falls_back_beyond_its_buckets(tiny_model_dir):
    llm = LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False, max_num_seqs=8)
    expected = greedy(llm, PROMPTS, 12)
    llm.engine.runner.enable_static_decode(max_batch=2, max_context=64, capture=False)
    assert greedy(llm, PROMPTS, 12) == expected  # 4 sequences > 2: the eager path runs those steps
    assert all(batch <= 2 for batch, _, _ in llm.engine.runner.decode_graphs.steps)


def test_input_buffer_holds_exactly_the_rows_of_each_step():
    """The buffer is updated in place (only rows whose block table changed are rewritten): after
    every step it must equal the rows built from scratch, padding rows pointing at the scratch
    block only, also when a request's list is cleared and regrown (preemption) or rows shrink."""
    import random

    import torch

    from starchat.engine.cuda_graphs import DecodeGraphs, _bucket

    block_size, scratch = 4, 999
    graphs = DecodeGraphs(None, torch.zeros(1, 2, 8, 4), block_size, scratch, max_batch=8, max_context=64, capture=False)
    graphs._forward = lambda step: torch.zeros(step.batch, 2)  # only the inputs are under test here
    rng = random.Random(0)
    tables = [[rng.randrange(900) for _ in range(rng.randint(1, 4))] for _ in range(8)]
    for _ in range(300):
        table = rng.choice(tables)
        action = rng.random()
        if action < 0.3 and len(table) < 16:  # 16 blocks of 4 tokens: the 64-token context
            table.append(rng.randrange(900))
        elif action < 0.4:  # released and regrown to the same length with other blocks
            length = len(table)
            table.clear()
            table.extend(rng.randrange(900) for _ in range(length))
        elif action < 0.5 and len(table) > 1:
            del table[-1]
        batch = rng.sample(tables, rng.randint(1, 8))
        positions = [rng.randrange((len(t) - 1) * block_size, len(t) * block_size) for t in batch]
        tokens = [rng.randrange(50000) for _ in batch]
        graphs.run(tokens, positions, batch)
        step = graphs.steps[(_bucket(len(batch), graphs.batch_buckets), _bucket(max(positions) + 1, graphs.context_buckets), False)]
        width = step.context // block_size
        expected = [[token, position] + t[:width] + [scratch] * (width - len(t[:width]))
                    for token, position, t in zip(tokens, positions, batch)]
        expected += [[0, 0] + [scratch] * width] * (step.batch - len(batch))
        assert step.host_inputs.tolist() == expected
