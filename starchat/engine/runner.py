"""Turns a scheduled batch into model inputs, runs the one forward path, samples."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from starchat.engine.cuda_graphs import DecodeGraphs
from starchat.engine.kv_cache import allocate_kv_cache
from starchat.engine.request import Request
from starchat.engine.sampler import PendingSample, Sampler, SamplerOutput
from starchat.engine.scheduler import ScheduledBatch
from starchat.model import AttentionMetadata, GPTBigCodeForCausalLM, PrefillChunk, triton_attention, triton_support
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
    # Rows of the speculative decodes' last tokens and drafts, concatenated in batch order
    verify_rows: torch.Tensor


class ModelRunner:
    def __init__(self, model: GPTBigCodeForCausalLM, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, eos_token_id: int):
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
        self.decode_products = tune_decode_products(model, dtype) if fast_gpu and triton_support.runs_on(device) else []
        self.decode_graphs: DecodeGraphs | None = None

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

        decodes = batch.decodes
        for request in decodes:
            position = request.num_computed_tokens
            token_ids.append(request.token_at(position))
            positions.append(position)
            logits_rows.append(len(slot_mapping))
            slot_mapping.extend(self._slots(request, position, position + 1))
            sampling.append(request)
        decode_addressing = {}
        if decodes:
            # Built in NumPy: PyTorch dispatches each of a dozen small operations, NumPy's cost
            # microseconds (measured: the whole step's inputs in 142-148 us instead of 225-246 at
            # batch 1, 285 instead of 366-386 at 32 sequences).
            lengths = np.array([r.num_computed_tokens + 1 for r in decodes])
            max_len = int(lengths.max())
            size = self.block_size
            block_table = np.zeros((len(decodes), -(-max_len // size)), dtype=np.int64)  # (Bd, max_blocks)
            for row, request in enumerate(decodes):
                block_table[row, :len(request.block_ids)] = request.block_ids
            decode_addressing = dict(decode_block_tables=torch.from_numpy(block_table).to(self.device),
                                     decode_context_lens=torch.from_numpy(lengths).to(self.device),
                                     decode_max_context=max_len)
            if not self.decode_kernel_reads_tables:
                offsets = np.arange(max_len)
                gather = block_table[:, offsets // size] * size + offsets % size  # (Bd, L)
                mask = np.where(offsets[None, :] < lengths[:, None], np.float32(0), np.float32("-inf"))
                decode_addressing.update(decode_gather_slots=torch.from_numpy(gather).to(self.device),
                                         decode_mask=torch.from_numpy(mask)[:, None, None, :].to(self.device))

        chunks: list[PrefillChunk] = []
        verify_rows: list[int] = []
        for request in batch.speculative:
            # The last token and its drafts: a chunk after the cached context, every row's logits kept.
            start, drafts = request.num_computed_tokens, request.draft_token_ids
            chunk_start = len(token_ids)
            token_ids.extend([request.token_at(start)] + drafts)
            positions.extend(range(start, start + 1 + len(drafts)))
            slot_mapping.extend(self._slots(request, start, start + 1 + len(drafts)))
            gather = torch.tensor(self._slots(request, 0, start + 1 + len(drafts)), dtype=torch.long, device=self.device)
            chunks.append(PrefillChunk(chunk_start, 1 + len(drafts), start, gather))
            verify_rows.extend(range(chunk_start, chunk_start + 1 + len(drafts)))

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
            num_decode_tokens=len(decodes),
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
        if batch.decodes and not batch.prefills and not batch.speculative and self.decode_graphs is not None:
            # A decode-only step on a GPU: replayed as a CUDA graph when its shape is captured.
            decodes = list(batch.decodes)
            positions = [request.num_computed_tokens for request in decodes]
            if self.decode_graphs.supports(len(decodes), max(positions) + 1):
                token_ids = [request.token_at(position) for request, position in zip(decodes, positions)]
                logits = self.decode_graphs.run(token_ids, positions, [request.block_ids for request in decodes])
                return PendingStep(decodes, self.sampler.launch(logits, decodes))
        if not batch.prefills and self.model.fused_decode is not None:
            return self._fused_decode(batch)  # decodes (and drafts) on a CPU: one native call
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

    def _fused_decode(self, batch: ScheduledBatch) -> "PendingStep":
        """Decodes and speculative decodes in the CPU's one-call decode step: a decode is a row; a
        speculative decode becomes one row per token (its last token, then each draft at the next position, all on the
        request's block table). The native step writes every row's keys and values to the cache
        before any row attends, so each row sees the drafts before it; its greedy output is the
        verification. (The GPU's decode kernel writes and attends row by row in parallel, so there
        the drafts go through the general path as a prompt chunk.)"""
        token_ids, positions, block_tables = [], [], []
        for request in batch.decodes:
            token_ids.append(request.token_at(request.num_computed_tokens))
            positions.append(request.num_computed_tokens)
            block_tables.append(request.block_ids)
        for request in batch.speculative:
            start = request.num_computed_tokens
            token_ids += [request.token_at(start)] + request.draft_token_ids
            positions += range(start, start + 1 + len(request.draft_token_ids))
            block_tables += [request.block_ids] * (1 + len(request.draft_token_ids))
        logits, greedy = self.model.fused_decode.step(token_ids, positions, block_tables, self.kv_cache, self.block_size)
        plain = len(batch.decodes)
        sample = self.sampler.launch(logits[:plain], batch.decodes, greedy_tokens=greedy[:plain]) if plain else None
        verification = self._verification(batch, logits[plain:], greedy[plain:]) if batch.speculative else None
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
