"""Decode attention on a GPU: one Triton kernel reads each sequence's keys and values in place
through its block table, and writes the new token's key and value into the cache.

The PyTorch path (attention.py) first gathers every decoding sequence's context into a new
(B, L, kv_dim) tensor, then runs a dozen kernels (two products, scale, mask, softmax, casts,
copies) per layer; at batch 1 in a CUDA graph their launch gaps cost more than their arithmetic.
Here a layer's decode attention is one kernel, or two when the context is split:

- A program takes one sequence, one KV head and one slice of the context ("split", as in
  flash-decoding: at batch 1 a single program per head would leave almost every SM idle). It
  loads the head's queries once, (G, D) for the G query heads that share the KV head (all 48 of
  StarChat's heads for its one MQA head: the keys are read once for all of them, as tensor-core
  products), then streams BLOCK_N cached tokens at a time with an online softmax in float32.
- The new token's key and value come from the projection's output, not from the cache: split 0
  starts its softmax with them and stores them to their slot. No program reads that slot, so no
  program waits for another.
- With more than one split, each writes its unnormalised sum, running maximum and denominator;
  a second kernel merges them per query head.

`TRITON_INTERPRET=1` runs both kernels on the CPU (tests/test_triton_kernels.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from starchat.model.triton_support import launch_options, runs_on, triton, wait_for_previous_kernel

if triton is not None:
    import triton.language as tl

BLOCK_N = 64  # cached tokens per inner step (32 in float32: its tiles need twice the shared memory,
# 115 KB at StarChat's shape with 64, over the 99 KB a program gets on sm_86/sm_89 GPUs)
PROGRAMS_WANTED = 256  # split contexts until about this many programs run (2 per SM on an H100/H200)
_TYPES = (torch.float16, torch.bfloat16, torch.float32)


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `decode_attention` runs for a model of `dtype` (its cache too) on `device`."""
    return dtype in _TYPES and runs_on(device)


if triton is not None:
    @triton.jit
    def _decode_split(query_ptr, key_ptr, value_ptr, cache_ptr, tables_ptr, lengths_ptr, out_ptr,
                      part_acc_ptr, part_max_ptr, part_sum_ptr,
                      stride_query, stride_new, stride_cache_kv, stride_slot, stride_table, stride_out,
                      tokens_per_split, num_splits, scale,
                      NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                      CACHE_BLOCK: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
                      USE_PDL: tl.constexpr = False):
        wait_for_previous_kernel(USE_PDL)
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        heads = tl.arange(0, BLOCK_G)
        dims = tl.arange(0, BLOCK_D)
        head_ok = heads < GROUP
        dim_ok = dims < HEAD_DIM
        query_cols = (kv_head * GROUP + heads)[:, None] * HEAD_DIM + dims[None, :]  # (G, D)
        query = tl.load(query_ptr + seq * stride_query + query_cols, mask=head_ok[:, None] & dim_ok[None, :], other=0.0)
        kv_cols = kv_head * HEAD_DIM + dims
        table = tables_ptr + seq.to(tl.int64) * stride_table

        running_max = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
        running_sum = tl.zeros((BLOCK_G,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
        cached = tl.load(lengths_ptr + seq) - 1  # tokens already in the cache; the new one is last
        if split == 0:
            # The new token starts split 0's softmax (before the loop: fewer registers live at once).
            new_key = tl.load(key_ptr + seq * stride_new + kv_cols, mask=dim_ok, other=0.0)
            new_value = tl.load(value_ptr + seq * stride_new + kv_cols, mask=dim_ok, other=0.0)
            running_max = tl.sum(query.to(tl.float32) * new_key.to(tl.float32)[None, :], 1) * scale  # (G,)
            running_sum += 1.0
            acc += new_value.to(tl.float32)[None, :]
            slot = tl.load(table + cached // CACHE_BLOCK).to(tl.int64) * CACHE_BLOCK + cached % CACHE_BLOCK
            tl.store(cache_ptr + slot * stride_slot + kv_cols, new_key, mask=dim_ok)
            tl.store(cache_ptr + stride_cache_kv + slot * stride_slot + kv_cols, new_value, mask=dim_ok)
        start = split * tokens_per_split
        end = tl.minimum(start + tokens_per_split, cached)
        for first in range(start, end, BLOCK_N):
            tokens = first + tl.arange(0, BLOCK_N)
            token_ok = tokens < end
            blocks = tl.load(table + tokens // CACHE_BLOCK, mask=token_ok, other=0)
            slots = blocks.to(tl.int64) * CACHE_BLOCK + tokens % CACHE_BLOCK
            tile = slots[:, None] * stride_slot + kv_cols[None, :]  # (N, D)
            tile_mask = token_ok[:, None] & dim_ok[None, :]
            keys = tl.load(cache_ptr + tile, mask=tile_mask, other=0.0)
            scores = tl.dot(query, tl.trans(keys), input_precision=PRECISION) * scale  # (G, N) float32
            scores = tl.where(token_ok[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, 1))
            probs = tl.exp(scores - new_max[:, None])
            rescale = tl.exp(running_max - new_max)
            running_sum = running_sum * rescale + tl.sum(probs, 1)
            values = tl.load(cache_ptr + stride_cache_kv + tile, mask=tile_mask, other=0.0)
            acc = acc * rescale[:, None] + tl.dot(probs.to(values.dtype), values, input_precision=PRECISION)
            running_max = new_max

        if SINGLE_SPLIT:
            out = acc / running_sum[:, None]
            tl.store(out_ptr + seq * stride_out + query_cols, out.to(out_ptr.dtype.element_ty),
                     mask=head_ok[:, None] & dim_ok[None, :])
        else:
            part = ((seq * NUM_KV_HEADS + kv_head) * num_splits + split) * GROUP + heads  # (G,) rows of (B, KVH, S, G)
            tl.store(part_max_ptr + part, running_max, mask=head_ok)
            tl.store(part_sum_ptr + part, running_sum, mask=head_ok)
            tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc,
                     mask=head_ok[:, None] & dim_ok[None, :])

    @triton.jit
    def _merge_splits(part_acc_ptr, part_max_ptr, part_sum_ptr, out_ptr, stride_out, num_splits,
                      NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr = False):
        wait_for_previous_kernel(USE_PDL)
        seq = tl.program_id(0)
        head = tl.program_id(1)
        kv_head = head // GROUP
        splits = tl.arange(0, BLOCK_S)
        dims = tl.arange(0, BLOCK_D)
        split_ok = splits < num_splits
        dim_ok = dims < HEAD_DIM
        part = ((seq * NUM_KV_HEADS + kv_head) * num_splits + splits) * GROUP + head % GROUP  # (S,)
        maxima = tl.load(part_max_ptr + part, mask=split_ok, other=float("-inf"))
        # Split 0 always holds the new token, so the overall maximum is finite; empty splits
        # (context shorter than the bucket) carry -inf and weigh 0.
        weights = tl.exp(maxima - tl.max(maxima, 0))
        total = tl.sum(tl.load(part_sum_ptr + part, mask=split_ok, other=0.0) * weights, 0)
        acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=split_ok[:, None] & dim_ok[None, :],
                      other=0.0)
        out = tl.sum(acc * weights[:, None], 0) / total
        tl.store(out_ptr + seq * stride_out + head * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


@dataclass(frozen=True)
class LaunchSettings:
    constexprs: dict  # BLOCK_G, BLOCK_D, BLOCK_N, PRECISION of _decode_split
    num_warps: int


def launch_settings(dtype: torch.dtype, group: int, head_dim: int) -> LaunchSettings:
    """Tile sizes and warps of `_decode_split` for a model (tests/test_triton_compile.py compiles these)."""
    block_g = max(16, triton.next_power_of_2(group))  # tl.dot needs 16 rows at least
    block_d = max(16, triton.next_power_of_2(head_dim))
    # Compiled for sm_90 (Triton 3.9): 4 warps spill registers from 2,048 accumulators up
    # (StarChat's 64 x 128 tile spilled 464 bytes a thread); 8 warps hold them (191 registers), and
    # 16 its float32 tiles (8 spilled 104 bytes on sm_80). Triton 3.6 (the lent GPUs' PyTorch)
    # also spilled a 1,024-value float32 tile with 4 warps.
    tile = block_g * block_d
    warps = 4 if tile < (1024 if dtype == torch.float32 else 2048) else 16 if dtype == torch.float32 and tile >= 8192 else 8
    return LaunchSettings(dict(BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=BLOCK_N // 2 if dtype == torch.float32 else BLOCK_N,
                               # float32 models stay float32 (TF32 would round the scores to 10 bits)
                               PRECISION="ieee" if dtype == torch.float32 else "tf32"), warps)


def split_count(num_seqs: int, num_kv_heads: int, max_context: int) -> int:
    """How many slices each sequence's context is cut into: enough programs to fill the GPU,
    never slices shorter than BLOCK_N tokens."""
    wanted = -(-PROGRAMS_WANTED // max(1, num_seqs * num_kv_heads))
    return max(1, min(wanted, -(-max_context // BLOCK_N)))


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, max_context: int, block_size: int,
                     num_heads: int, num_kv_heads: int, scale: float) -> torch.Tensor:
    """Attention output (B, H*D) of B decoding sequences, whose new tokens' keys and values (B, KVH*D)
    are written into `layer_cache` (2, num_slots, KVH*D) on the way. `context_lens` (B,) counts
    each sequence's tokens including the new one, at most `max_context` (a bound the caller knows
    without reading the GPU: a CUDA graph's bucket); `block_tables` (B, >= ceil(max_context /
    block_size)) lists their cache blocks. Requires `supports(query.device, query.dtype)` and a cache of query's dtype."""
    num_seqs = query.shape[0]
    head_dim = query.shape[1] // num_heads
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    if num_seqs == 0:
        return out
    if key.stride(1) != 1 or value.stride(0) != key.stride(0) or query.stride(1) != 1 or not layer_cache.is_contiguous():
        raise ValueError("decode_attention: query/key/value rows must have unit column stride, the cache must be contiguous")
    splits = split_count(num_seqs, num_kv_heads, max_context)
    launch = launch_settings(query.dtype, group, head_dim)
    block_n = launch.constexprs["BLOCK_N"]
    tokens_per_split = -(-max(1, max_context - 1) // (splits * block_n)) * block_n
    if splits > 1:
        part_acc = torch.empty(num_seqs, num_kv_heads, splits, group, head_dim, dtype=torch.float32, device=query.device)
        part_max = torch.empty(num_seqs, num_kv_heads, splits, group, dtype=torch.float32, device=query.device)
        part_sum = torch.empty_like(part_max)
    else:
        part_acc = part_max = part_sum = out  # unused
    _decode_split[(num_seqs, num_kv_heads, splits)](
        query, key, value, layer_cache, block_tables, context_lens, out, part_acc, part_max, part_sum,
        query.stride(0), key.stride(0), layer_cache.stride(0), layer_cache.stride(1), block_tables.stride(0), out.stride(0),
        tokens_per_split, splits, scale,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim, CACHE_BLOCK=block_size, SINGLE_SPLIT=splits == 1,
        num_warps=launch.num_warps, **launch.constexprs, **launch_options(query.device))
    if splits > 1:
        _merge_splits[(num_seqs, num_heads)](part_acc, part_max, part_sum, out, out.stride(0), splits,
                                             NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim,
                                             BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=launch.constexprs["BLOCK_D"],
                                             num_warps=1, **launch_options(query.device))
    return out
