"""Attention over a slot-addressed KV cache, for a step that mixes decodes and prefill chunks.

The cache of one layer is a tensor (2, num_slots, kv_dim): keys then values, one row per cached
token, all KV heads of that token side by side (one head for multi-query checkpoints: the cache
never expands it to the query heads). Which slot holds which token is the engine's business;
the model only sees, per step, where to write the new tokens and which slots to read.

Token order in a step: all decode tokens first (one per sequence, or for a speculative decode one
per verified position: its last token, then each draft), then the prefill chunks one after
another. Decodes are attended in one kernel that reads the cache rows in place (on a GPU
starchat's Triton kernel, through the block tables; on a CPU its native kernel, through the
gathered slot lists), else in one batched matmul over a gathered copy. Prefill chunks: on a CPU
with AMX tiles all of them in one native call (native/prompt_attention.c), else each in one SDPA
call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from starchat.model import native, triton_attention


@dataclass(frozen=True)
class PromptAttention:
    """How a layer's prefill chunks attend, chosen by the loader for the device and weights."""

    dtype: torch.dtype | None = None  # SDPA in this dtype (None: the activations')
    # Every chunk of a step in one native call on AMX tiles where they are granted (CPU,
    # native/prompt_attention.c), SDPA where not (or for a head size the tiles do not take).
    amx_tiles: bool = False
    # On the tiles: queries, keys, values and weights kept to 16 bits of significand as two
    # bfloat16 halves (float16 models, whose SDPA attention is float32), not rounded to bfloat16.
    split: bool = False


@dataclass
class PrefillChunk:
    """`length` new tokens of one sequence at offset `start` in the step, after `context_len` cached ones."""

    start: int
    length: int
    context_len: int
    # Slots of all context_len + length tokens, to read keys/values back; None when context_len == 0
    # (the chunk then attends only to itself and uses its freshly computed keys directly).
    gather_slots: torch.Tensor | None


@dataclass
class AttentionMetadata:
    """Per-step addressing, computed once by the engine and shared by every layer.

    Decoding sequences are described by their block tables and lengths; the slot lists and mask
    that the CPU kernel and the PyTorch path read are derived from those (`decode_reads`) unless
    the caller has built them already (the runner does, in NumPy, on a CPU)."""

    slot_mapping: torch.Tensor  # (T,) cache slot written by each new token
    num_decode_tokens: int  # the first num_decode_tokens tokens are decodes
    prefill_chunks: list[PrefillChunk]
    block_size: int = 0  # tokens per cache block
    decode_block_tables: torch.Tensor | None = None  # (Bd, >= ceil(decode_max_context / block_size)) cache blocks
    decode_context_lens: torch.Tensor | None = None  # (Bd,) tokens of each decoding sequence, the new one included
    decode_max_context: int = 0  # a bound on decode_context_lens known without reading the device
    decode_gather_slots: torch.Tensor | None = None  # (Bd, decode_max_context) slots to read for each sequence
    decode_mask: torch.Tensor | None = None  # (Bd, 1, 1, decode_max_context) additive float mask: 0 keep, -inf padding
    # Whether several decode rows belong to one sequence (a speculative decode: its last token and
    # each draft at the next position, on the same block table), so that rows read keys and values
    # that other rows of the step write.
    decode_rows_share_sequences: bool = False

    def decode_reads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(decode_gather_slots, decode_mask), computed from the block tables on first use."""
        if self.decode_gather_slots is None:
            tables, lengths = self.decode_block_tables, self.decode_context_lens
            offsets = torch.arange(self.decode_max_context, device=tables.device)
            self.decode_gather_slots = tables[:, offsets // self.block_size] * self.block_size + offsets % self.block_size
            mask = torch.zeros(self.decode_gather_slots.shape, dtype=torch.float32, device=tables.device)
            self.decode_mask = mask.masked_fill(offsets[None, :] >= lengths[:, None], float("-inf"))[:, None, None, :]
        return self.decode_gather_slots, self.decode_mask


def write_kv_cache(layer_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    # The cache keeps the model's dtype; on a CPU, 16-bit models compute in float32 (cpu_linear.py)
    # and the native kernel converts and stores their rows in one pass.
    if key.device.type == "cpu" and native.try_write_cache(layer_cache, key, value, slot_mapping):
        return
    layer_cache[0].index_copy_(0, slot_mapping, key.to(layer_cache.dtype))  # (num_slots, kv_dim)
    layer_cache[1].index_copy_(0, slot_mapping, value.to(layer_cache.dtype))


def paged_attention(
    query: torch.Tensor,  # (T, H*D)
    key: torch.Tensor,  # (T, KVH*D), the new tokens' keys
    value: torch.Tensor,  # (T, KVH*D)
    layer_cache: torch.Tensor,  # (2, num_slots, KVH*D)
    metadata: AttentionMetadata,
    num_heads: int,
    num_kv_heads: int,
    scale: float,
    prompt: PromptAttention = PromptAttention(),
) -> torch.Tensor:  # (T, H*D)
    head_dim = query.shape[1] // num_heads
    group = num_heads // num_kv_heads
    num_decode = metadata.num_decode_tokens
    decoded = None
    if (num_decode and metadata.decode_block_tables is not None and layer_cache.dtype == query.dtype
            and triton_attention.supports(query.device, query.dtype)):
        # One kernel for the decodes, which also writes their keys and values into the cache. Its
        # programs run in parallel, each reading only slots before its own row's: rows that read
        # other rows' keys (drafts) need every row's written first. (The kernel then stores the
        # same bits again, so a program reading such a slot meanwhile reads the same value.)
        if metadata.decode_rows_share_sequences:
            write_kv_cache(layer_cache, key[:num_decode], value[:num_decode], metadata.slot_mapping[:num_decode])
        decoded = triton_attention.decode_attention(
            query[:num_decode], key[:num_decode], value[:num_decode], layer_cache, metadata.decode_block_tables,
            metadata.decode_context_lens, metadata.decode_max_context, metadata.block_size, num_heads, num_kv_heads, scale)
        if num_decode < query.shape[0]:
            write_kv_cache(layer_cache, key[num_decode:], value[num_decode:], metadata.slot_mapping[num_decode:])
    else:
        write_kv_cache(layer_cache, key, value, metadata.slot_mapping)
        if num_decode and query.device.type == "cpu" and native.available():
            # A dozen small PyTorch operations per layer cost more than the arithmetic here.
            slots, mask = metadata.decode_reads()
            decoded = native.decode_attention(query[:num_decode], layer_cache, slots, mask, num_heads, num_kv_heads, scale,
                                              metadata.decode_context_lens)
    if decoded is not None and not metadata.prefill_chunks:
        return decoded
    output = torch.empty_like(query)
    if decoded is not None:
        output[:num_decode] = decoded
    elif num_decode:
        q = query[:num_decode].view(num_decode, num_kv_heads, group, head_dim)  # (Bd, KVH, G, D)
        slots, decode_mask = metadata.decode_reads()  # (Bd, L), (Bd, 1, 1, L)
        k = layer_cache[0][slots].to(query.dtype).view(num_decode, -1, num_kv_heads, head_dim)  # (Bd, L, KVH, D)
        v = layer_cache[1][slots].to(query.dtype).view(num_decode, -1, num_kv_heads, head_dim)
        scores = torch.matmul(q, k.permute(0, 2, 3, 1))  # (Bd, KVH, G, L)
        # Softmax in float32 whatever the model dtype: fp16 decoding degenerates otherwise.
        probs = torch.softmax(scores.float() * scale + decode_mask, dim=-1).to(v.dtype)
        attended = torch.matmul(probs, v.transpose(1, 2))  # (Bd, KVH, G, D)
        output[:num_decode] = attended.reshape(num_decode, num_heads * head_dim)

    if prompt.amx_tiles and _prompt_chunks_on_tiles(query, key, value, layer_cache, output, metadata, num_heads,
                                                    num_kv_heads, scale, prompt.split):
        return output
    for chunk in metadata.prefill_chunks:
        rows = slice(chunk.start, chunk.start + chunk.length)
        q = query[rows].view(1, chunk.length, num_heads, head_dim).transpose(1, 2)  # (1, H, n, D)
        if chunk.gather_slots is None:
            k_rows, v_rows = key[rows], value[rows]  # (n, KVH*D)
            mask, causal = None, True
        else:
            k_rows, v_rows = (layer_cache[i][chunk.gather_slots].to(query.dtype) for i in (0, 1))  # (L, KVH*D)
            # Token i of the chunk sees cached positions [0, context_len + i]: causality aligned to
            # the bottom right. As a CausalBias, not a materialized mask, SDPA keeps its flash or
            # memory-efficient kernel on a GPU (a mask tensor would force a slower one).
            mask, causal = causal_lower_right(chunk.length, chunk.context_len + chunk.length), False
        k = k_rows.view(1, -1, num_kv_heads, head_dim).transpose(1, 2)  # (1, KVH, L, D)
        v = v_rows.view(1, -1, num_kv_heads, head_dim).transpose(1, 2)
        if group > 1:
            # A view, not a copy: the cache stays one KV head.
            k = k.expand(1, num_kv_heads * group, k.shape[2], head_dim) if num_kv_heads == 1 else k.repeat_interleave(group, dim=1)
            v = v.expand(1, num_kv_heads * group, v.shape[2], head_dim) if num_kv_heads == 1 else v.repeat_interleave(group, dim=1)
        if prompt.dtype is not None:
            q, k, v = q.to(prompt.dtype), k.to(prompt.dtype), v.to(prompt.dtype)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)  # (1, H, n, D)
        output[rows] = attended.transpose(1, 2).reshape(chunk.length, num_heads * head_dim).to(output.dtype)
    return output


def _prompt_chunks_on_tiles(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_cache: torch.Tensor,
                            output: torch.Tensor, metadata: AttentionMetadata, num_heads: int, num_kv_heads: int,
                            scale: float, split: bool) -> bool:
    """Every prefill chunk's attention into `output` in one native call; False (nothing written)
    where the tiles cannot take it. A fresh chunk reads its keys and values from this step's
    rows (float32: as exact as the SDPA path), one with cached context through its slots."""
    if query.dtype != torch.float32 or query.device.type != "cpu" or not native.available():
        return False
    chunks = []
    for chunk in metadata.prefill_chunks:
        if chunk.gather_slots is None:
            rows = slice(chunk.start, chunk.start + chunk.length)
            chunks.append((chunk.start, chunk.length, 0, key[rows], value[rows], None))
        else:
            chunks.append((chunk.start, chunk.length, chunk.context_len, layer_cache[0], layer_cache[1],
                           chunk.gather_slots.contiguous()))
    return native.prompt_attention(query, output, chunks, num_heads, num_kv_heads, scale, split)
