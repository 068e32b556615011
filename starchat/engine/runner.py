"""Turns a scheduled batch into model inputs, runs the one forward path, samples."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from starchat.engine.cuda_graphs import DecodeGraphs
from starchat.engine.host_memory import collapse_into_huge_pages, keep_freed_host_memory
from starchat.engine.kv_cache import allocate_kv_cache
from starchat.engine.request import Request
from starchat.engine.sampler import PendingSample, Sampler, SamplerOutput
from starchat.engine.scheduler import ScheduledBatch
from starchat.model import AttentionMetadata, GPTBigCodeForCausalLM, PrefillChunk, triton_attention, triton_support
from starchat.model.cpu_linear import PackedLinear
from starchat.model.tuned_linear import fuse_gelu_into_products, tune_decode_products


@dataclass
class StepInputs:
    token_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    metadata: AttentionMetadata
    sampling: list[Request]  # requests that get a next token this step, in logits-row order
    logits_rows: torch.Tensor  # (N,) rows of the hidden states whose logits are sampled
    # (request, first row, first position, count): rows whose logits score the prompt token
    # after them, for requests that asked for prompt log-probabilities
    prompt_scoring: list[tuple[Request, int, int, int]]
    # Rows of the speculative decodes' last tokens and drafts (decode rows after the plain decodes')
    verify_rows: torch.Tensor


class ModelRunner:
    def __init__(self, model: GPTBigCodeForCausalLM, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, eos_token_id: int, progress: bool = True):
        self.model = model
        self.block_size = block_size
        self.device = device
        # One block more than the allocator hands out: the scratch block that padding rows of a
        # static (CUDA-graph) decode step write into.
        self.scratch_block = num_blocks
        self.kv_cache = allocate_kv_cache(model.config, num_blocks + 1, block_size, dtype, device)
        self.sampler = Sampler(eos_token_id)
        # The Triton decode kernel reads block tables; the CPU kernel and PyTorch path read slot lists.
        self.decode_kernel_reads_tables = (triton_attention.supports(device, dtype)
                                           and triton_support.check_kernels(model.config, dtype, device))
        # On a GPU (16-bit models: float32 ones are for checking numerics, not speed) the MLP's
        # GELU rides on its first product, and per weight shape cuBLAS or the Triton product
        # kernel is timed here for decode steps.
        fast_gpu = device.type == "cuda" and dtype != torch.float32
        self.fused_gelus = fuse_gelu_into_products(model, dtype) if fast_gpu else 0
        self.decode_products = tune_decode_products(model, dtype, progress=progress) if fast_gpu and triton_support.runs_on(device) else []
        self.decode_graphs: DecodeGraphs | None = None
        if device.type == "cpu":
            keep_freed_host_memory()  # steps reuse their activations' pages (host_memory.py)
            # Weights mapped from a panels folder are the page cache's (loader: asked for as huge pages there).
            collapse_into_huge_pages([m.packed_weight for m in model.modules()
                                      if isinstance(m, PackedLinear) and not m.mapped_from_file])

    def enable_static_decode(self, max_batch: int, max_context: int, capture: bool = True) -> None:
        """Run pure-decode steps through fixed-shape buffers, replayed as CUDA graphs when `capture`."""
        self.decode_graphs = DecodeGraphs(self.model, self.kv_cache, self.block_size, self.scratch_block,
                                          max_batch, max_context, capture)

    def _slots(self, request: Request, start: int, end: int) -> list[int]:
        size, blocks = self.block_size, request.block_ids
        return [blocks[t // size] * size + t % size for t in range(start, end)]

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        token_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        sampling: list[Request] = []  # requests that get a next token this step, in logits-row order
        logits_rows: list[int] = []

        # Decode rows: one per decode, then one per verified position of each speculative decode.
        row_tokens, row_positions, row_blocks = decode_rows(batch)
        num_rows = len(row_tokens)
        token_ids.extend(row_tokens)
        positions.extend(row_positions)
        for blocks, position in zip(row_blocks, row_positions):
            slot_mapping.append(blocks[position // self.block_size] * self.block_size + position % self.block_size)
        logits_rows.extend(range(len(batch.decodes)))
        sampling.extend(batch.decodes)
        verify_rows = list(range(len(batch.decodes), num_rows))
        decode_addressing = {}
        if num_rows:
            # Built in NumPy: PyTorch dispatches each of a dozen small operations, NumPy's cost
            # microseconds (measured: the whole step's inputs in 142-148 us instead of 225-246 at
            # batch 1, 285 instead of 366-386 at 32 sequences).
            lengths = np.array(row_positions) + 1
            max_len = int(lengths.max())
            size = self.block_size
            block_table = np.zeros((num_rows, -(-max_len // size)), dtype=np.int64)  # (rows, max_blocks)
            for row, blocks in enumerate(row_blocks):
                block_table[row, :len(blocks)] = blocks
            decode_addressing = dict(decode_block_tables=torch.from_numpy(block_table).to(self.device),
                                     decode_context_lens=torch.from_numpy(lengths).to(self.device),
                                     decode_max_context=max_len,
                                     decode_rows_share_sequences=bool(batch.speculative))
            if not self.decode_kernel_reads_tables:
                offsets = np.arange(max_len)
                gather = block_table[:, offsets // size] * size + offsets % size  # (rows, L)
                mask = np.where(offsets[None, :] < lengths[:, None], np.float32(0), np.float32("-inf"))
                decode_addressing.update(decode_gather_slots=torch.from_numpy(gather).to(self.device),
                                         decode_mask=torch.from_numpy(mask)[:, None, None, :].to(self.device))

        chunks: list[PrefillChunk] = []
        prompt_scoring: list[tuple[Request, int, int, int]] = []
        for request, length in batch.prefills:
            start = request.num_computed_tokens
            if request.params.prompt_logprobs is not None:
                # Row of position p scores prompt token p + 1 (the last prompt token is scored by no row).
                count = min(start + length, len(request.prompt_token_ids) - 1) - start
                if count > 0:
                    prompt_scoring.append((request, len(token_ids), start, count))
            all_ids = request.all_token_ids
            chunk_start = len(token_ids)
            token_ids.extend(all_ids[start:start + length])
            positions.extend(range(start, start + length))
            slot_mapping.extend(self._slots(request, start, start + length))
            gather = None
            if start > 0:
                gather = torch.tensor(self._slots(request, 0, start + length), dtype=torch.long, device=self.device)
            chunks.append(PrefillChunk(chunk_start, length, start, gather))
            if start + length == request.num_tokens:  # prompt done: its last token gives the next one
                logits_rows.append(chunk_start + length - 1)
                sampling.append(request)

        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=self.device),
            num_decode_tokens=num_rows,
            prefill_chunks=chunks,
            block_size=self.block_size,
            **decode_addressing,
        )
        return StepInputs(
            token_ids=torch.tensor(token_ids, dtype=torch.long, device=self.device),
            positions=torch.tensor(positions, dtype=torch.long, device=self.device),
            metadata=metadata,
            sampling=sampling,
            logits_rows=torch.tensor(logits_rows, dtype=torch.long, device=self.device),
            prompt_scoring=prompt_scoring,
            verify_rows=torch.tensor(verify_rows, dtype=torch.long, device=self.device),
        )

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch) -> "PendingStep":
        """Queue the step's work and its sampling; on a GPU this returns before they have run."""
        if not batch.prefills and self.decode_graphs is not None:
            # Decodes and speculative decodes only, on a GPU: replayed as a CUDA graph when its
            # shape is captured.
            token_ids, positions, block_tables = decode_rows(batch)
            if token_ids and self.decode_graphs.supports(len(token_ids), max(positions) + 1):
                logits = self.decode_graphs.run(token_ids, positions, block_tables,
                                                rows_share_sequences=bool(batch.speculative))
                return self._decode_step(batch, logits, None)
        if not batch.prefills and self.model.fused_decode is not None:
            # Decodes and speculative decodes on a CPU: one native call, which writes every row's
            # keys and values to the cache before any row attends.
            logits, greedy = self.model.fused_decode.step(*decode_rows(batch), self.kv_cache, self.block_size)
            return self._decode_step(batch, logits, greedy)
        inputs = self.prepare(batch)
        hidden = self.model(inputs.token_ids, inputs.positions, inputs.metadata, self.kv_cache)  # (T, C)
        scored = [self._score_prompt(hidden, *piece) for piece in inputs.prompt_scoring]
        verification = None
        if batch.speculative:  # the distributions after the last token and after each draft
            verification = self._verification(batch, self.model.compute_logits(hidden[inputs.verify_rows]), None)
        if not inputs.sampling:
            return PendingStep(inputs.sampling, None, scored, verification)
        logits = self.model.compute_logits(hidden[inputs.logits_rows])  # (N, V)
        return PendingStep(inputs.sampling, self.sampler.launch(logits, inputs.sampling), scored, verification)

    def _decode_step(self, batch: ScheduledBatch, logits: torch.Tensor, greedy: torch.Tensor | None) -> "PendingStep":
        """Sampling and verification of a step of decode rows (`decode_rows`' order), with their
        argmax where the step computed it."""
        plain = len(batch.decodes)
        sample = None
        if plain:
            sample = self.sampler.launch(logits[:plain], batch.decodes,
                                         greedy_tokens=greedy[:plain] if greedy is not None else None)
        verification = None
        if batch.speculative:
            verification = self._verification(batch, logits[plain:], greedy[plain:] if greedy is not None else None)
        return PendingStep(list(batch.decodes), sample, [], verification)

    def _verification(self, batch: ScheduledBatch, logits: torch.Tensor, greedy: torch.Tensor | None) -> "PendingVerify":
        # The drafts are taken now: the engine clears them from the requests before reading the step.
        return PendingVerify(self.sampler, [(request, request.draft_token_ids) for request in batch.speculative],
                             logits, greedy)

    def _score_prompt(self, hidden: torch.Tensor, request: Request, row: int, first: int, count: int) -> "PromptScores":
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[row:row + count]), dim=-1)  # (count, V)
        targets = torch.tensor(request.prompt_token_ids[first + 1:first + 1 + count], device=self.device)
        chosen = logprobs.gather(1, targets[:, None]).squeeze(1)
        top_n = request.params.prompt_logprobs
        top_values, top_ids = logprobs.topk(top_n, dim=-1) if top_n else (None, None)
        return PromptScores(request, first + 1, chosen, top_values, top_ids)


def decode_rows(batch: ScheduledBatch) -> tuple[list[int], list[int], list[list[int]]]:
    """A step's decode rows as (token ids, positions, block tables): a row per decode, then per
    speculative decode one for its last token and one for each draft, at the positions after it
    and on the request's block table (which already holds the drafts' slots). Each row attends
    to the positions up to its own, so a draft's row sees the drafts before it."""
    token_ids, positions, block_tables = [], [], []
    for request in batch.decodes:
        token_ids.append(request.token_at(request.num_computed_tokens))
        positions.append(request.num_computed_tokens)
        block_tables.append(request.block_ids)
    for request in batch.speculative:
        start, drafts = request.num_computed_tokens, request.draft_token_ids
        token_ids += [request.token_at(start)] + drafts
        positions += range(start, start + 1 + len(drafts))
        block_tables += [request.block_ids] * (1 + len(drafts))
    return token_ids, positions, block_tables


@dataclass
class PromptScores:
    """Log-probabilities of prompt tokens first_position.. of one request, as device tensors."""

    request: Request
    first_position: int
    chosen: torch.Tensor  # (count,) log-probability of each prompt token given those before it
    top_values: torch.Tensor | None  # (count, n) the n most likely tokens at each position
    top_ids: torch.Tensor | None

    def result(self) -> list[tuple[int, float, list[tuple[int, float]]]]:
        """[(position, logprob, [(token id, logprob)] alternatives)]"""
        chosen = self.chosen.tolist()
        values = self.top_values.tolist() if self.top_values is not None else [[]] * len(chosen)
        ids = self.top_ids.tolist() if self.top_ids is not None else [[]] * len(chosen)
        return [(self.first_position + i, chosen[i], list(zip(ids[i], values[i]))) for i in range(len(chosen))]


@dataclass
class PendingStep:
    sampling: list[Request]  # requests that get a next token from this step, in row order
    sample: PendingSample | None  # None when no request gets one (prompt chunks only)
    prompt_scores: list[PromptScores] = field(default_factory=list)
    verification: "PendingVerify | None" = None  # speculative decodes, when the step has some

    def result(self) -> tuple[list[Request], SamplerOutput | None]:
        """Wait for the step; its requests and their tokens."""
        return self.sampling, self.sample.result() if self.sample is not None else None


@dataclass
class PendingVerify:
    """A step's speculative decodes (in row order, each with the drafts it was launched with) and
    the logits of their rows, as device tensors; `result()` decides which drafts are kept."""

    sampler: Sampler
    verifying: list[tuple[Request, list[int]]]
    logits: torch.Tensor  # (sum of 1 + drafts, V) after the last token and after each draft
    greedy_tokens: torch.Tensor | None  # their argmax, where the step computed it

    def result(self) -> list[tuple[Request, list[int], SamplerOutput]]:
        """Per speculative decode: the request, its drafts, and the tokens (with logprobs) it gets."""
        outputs = self.sampler.verify(self.logits, self.greedy_tokens, self.verifying)
        return [(request, drafts, output) for (request, drafts), output in zip(self.verifying, outputs)]
