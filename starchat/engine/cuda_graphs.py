"""Decode steps replayed as CUDA graphs: one graph per (batch bucket, context bucket, kind).

On a GPU a decode step is hundreds of small kernels (a dozen per layer); at small batch their
launch cost exceeds their run time. A captured graph launches all of them at once. Graphs need
fixed shapes and addresses, so every bucket owns its input buffer: each sequence's last token,
its position and its block table, padded to the bucket. The attention metadata (slots to write,
slots to read, the padding mask) is computed from that buffer inside the graph, so a step is one
host-to-device copy, one replay and the logits. Padding rows decode token 0 at position 0 into a
scratch block that no request owns.

A speculative decode is one row per verified position (runner.decode_rows), so verify steps
replay graphs too; theirs differ in one thing: every row's key and value are written to the cache
before any row attends (a draft's row reads the rows before it), so they are captured apart.

The same static step also runs without capture (`capture=False`): that is how the padding logic
is tested on machines without a GPU, and the eager fallback stays the model's one forward path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from starchat.model import AttentionMetadata, GPTBigCodeForCausalLM

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
_SMALLEST_CONTEXT_BUCKET = 64


def _bucket(value: int, buckets: list[int]) -> int:
    for bucket in buckets:
        if value <= bucket:
            return bucket
    raise ValueError(f"{value} is over the largest bucket {buckets[-1]}")


@dataclass
class _StaticStep:
    batch: int
    context: int
    host_inputs: torch.Tensor  # (B, 2 + blocks) int64, pinned on a GPU: token, position, block table
    inputs: torch.Tensor  # the same on the model's device; the graph reads it
    logits: torch.Tensor | None = None  # (B, V) float32, written by the graph
    graph: "torch.cuda.CUDAGraph | None" = None
    tables: list = field(default_factory=list)  # per row: the block list host_inputs holds, None for padding
    rows_share_sequences: bool = False  # a verify step's graph (AttentionMetadata.decode_rows_share_sequences)


class DecodeGraphs:
    def __init__(self, model: GPTBigCodeForCausalLM, kv_cache: torch.Tensor, block_size: int, scratch_block: int,
                 max_batch: int, max_context: int, capture: bool = True):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.device = kv_cache.device
        self.capture = capture and self.device.type == "cuda"
        self.batch_buckets = [b for b in _BATCH_BUCKETS if b < max_batch] + [max_batch]
        context, buckets = max(_SMALLEST_CONTEXT_BUCKET, block_size), []
        full = -(-max_context // block_size) * block_size
        while context < full:
            buckets.append(context)
            context *= 2
        self.context_buckets = buckets + [full]
        self.steps: dict[tuple[int, int, bool], _StaticStep] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    def supports(self, num_seqs: int, max_context: int) -> bool:
        return num_seqs <= self.batch_buckets[-1] and max_context <= self.context_buckets[-1]

    @torch.inference_mode()
    def run(self, token_ids: list[int], positions: list[int], block_tables: list[list[int]],
            rows_share_sequences: bool = False) -> torch.Tensor:
        """Logits (n, V) float32 of one decode step of n rows (several rows of one sequence when
        `rows_share_sequences`: a speculative decode's positions)."""
        n = len(token_ids)
        step = self._step(_bucket(n, self.batch_buckets), _bucket(max(positions) + 1, self.context_buckets),
                          rows_share_sequences)
        host = step.host_inputs.numpy()
        host[:n, 0] = token_ids
        host[:n, 1] = positions
        # Block tables change every block_size tokens or when the batch changes: rewrite only the
        # rows that differ from what the buffer holds (at 128 sequences, building every row anew
        # cost 0.4 ms of host time a step, which the GPU waits for).
        width = host.shape[1] - 2
        for row, blocks in enumerate(block_tables):
            if step.tables[row] != blocks:
                count = min(len(blocks), width)
                host[row, 2:2 + count] = blocks[:count]
                host[row, 2 + count:] = self.scratch_block
                step.tables[row] = list(blocks)
        for row in range(n, step.batch):
            if step.tables[row] is not None:  # a padding row must not point at a request's blocks
                host[row, :2] = 0
                host[row, 2:] = self.scratch_block
                step.tables[row] = None
        step.inputs.copy_(step.host_inputs, non_blocking=True)
        if step.graph is not None:
            step.graph.replay()
        else:
            step.logits = self._forward(step)
        return step.logits[:n]

    def _step(self, batch: int, context: int, rows_share_sequences: bool) -> _StaticStep:
        key = (batch, context, rows_share_sequences)
        step = self.steps.get(key)
        if step is None:
            shape = (batch, 2 + context // self.block_size)
            host = torch.zeros(shape, dtype=torch.long, pin_memory=self.capture)
            host[:, 2:] = self.scratch_block
            step = _StaticStep(batch, context, host, host.to(self.device), tables=[None] * batch,
                               rows_share_sequences=rows_share_sequences)
            if self.capture:
                self._capture(step)
            self.steps[key] = step
        return step

    def _forward(self, step: _StaticStep) -> torch.Tensor:
        size = self.block_size
        tokens, positions, block_table = step.inputs[:, 0], step.inputs[:, 1], step.inputs[:, 2:]
        slot_mapping = block_table.gather(1, (positions // size)[:, None]).squeeze(1) * size + positions % size
        metadata = AttentionMetadata(slot_mapping=slot_mapping, num_decode_tokens=step.batch, prefill_chunks=[],
                                     block_size=size, decode_block_tables=block_table, decode_context_lens=positions + 1,
                                     decode_max_context=step.context,
                                     decode_rows_share_sequences=step.rows_share_sequences)
        hidden = self.model(tokens, positions, metadata, self.kv_cache)
        return self.model.compute_logits(hidden)

    def _capture(self, step: _StaticStep) -> None:
        # Warm-up off the default stream (as capture requires), then capture. The inputs are all
        # padding here, so these runs only write the scratch block.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(step)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            step.logits = self._forward(step)
        step.graph = graph
