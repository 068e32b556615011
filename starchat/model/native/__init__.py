"""Native CPU kernels: few-row matrix products that read each weight once (see linear.c)."""

from __future__ import annotations

import torch

from starchat.model.native.build import load

WEIGHT_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3}

def available() -> bool:
    return load() is not None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           scales: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ weight (N, K).T (* scales (N,)) (+ bias (N,)), in x's dtype (float32, float16
    or bfloat16; the arithmetic is float32).

    `weight` is float32, float16, bfloat16 or int8 (then `scales` is required); bias and scales
    are float32. Requires `available()`.
    """
    in_features, out_features = x.shape[-1], weight.shape[0]
    weight_type = WEIGHT_TYPES.get(weight.dtype)
    # Cheap checks only: this runs for every layer of every decode step.
    if weight_type is None or weight.shape[1] != in_features or not weight.is_contiguous():
        raise ValueError(f"native linear: unsupported weight {tuple(weight.shape)} {weight.dtype} for input {tuple(x.shape)}")
    if (weight_type == 3) != (scales is not None):
        raise ValueError("native linear: int8 weights need scales, other weights take none")
    for name, vector in (("bias", bias), ("scales", scales)):
        if vector is not None and (vector.dtype != torch.float32 or vector.numel() != out_features or not vector.is_contiguous()):
            raise ValueError(f"native linear: {name} must be a contiguous float32 vector of {out_features}")
    activation_type = WEIGHT_TYPES.get(x.dtype, 3)
    if activation_type == 3:
        raise ValueError(f"native linear: activations must be float32, float16 or bfloat16, not {x.dtype}")
    rows = x.contiguous()
    out = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype)
    status = load().starchat_linear(
        rows.data_ptr(), activation_type, rows.numel() // in_features, weight.data_ptr(), weight_type,
        scales.data_ptr() if scales is not None else None, bias.data_ptr() if bias is not None else None,
        out.data_ptr(), activation_type, out_features, in_features, torch.get_num_threads(),
    )
    if status:
        raise MemoryError(f"native linear: out of memory for {rows.numel()} activations") if status == -2 else \
            RuntimeError(f"native linear failed with status {status}")
    return out


CACHE_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def decode_attention(query: torch.Tensor, layer_cache: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
                     num_heads: int, num_kv_heads: int, scale: float) -> torch.Tensor:
    """One new token per sequence attending to its cached tokens (see decode_attention.c).

    query (B, H*D) and layer_cache (2, num_slots, KVH*D) share a dtype (float32, float16 or
    bfloat16); slots (B, L) int64 cache rows; mask (B, L) or (B, 1, 1, L) float32, 0 to keep and
    -inf for padding. Returns (B, H*D) in the query's dtype. Requires `available()`.
    """
    cache_type = CACHE_TYPES.get(query.dtype)
    batch, max_len = slots.shape
    head_dim = query.shape[1] // num_heads
    if cache_type is None or layer_cache.dtype != query.dtype or not layer_cache[0].is_contiguous():
        raise ValueError(f"native decode attention: query {query.dtype} and cache {layer_cache.dtype} must share a 16/32-bit float dtype")
    if slots.dtype != torch.int64 or mask.dtype != torch.float32 or mask.numel() != batch * max_len:
        raise ValueError("native decode attention: slots must be int64 (B, L) and mask float32 with B * L elements")
    query, slots, mask = query.contiguous(), slots.contiguous(), mask.contiguous()
    out = torch.empty_like(query)
    status = load().starchat_decode_attention(
        query.data_ptr(), layer_cache[0].data_ptr(), layer_cache[1].data_ptr(), cache_type, slots.data_ptr(),
        mask.data_ptr(), batch, max_len, num_heads, num_kv_heads, head_dim, scale, out.data_ptr(), torch.get_num_threads(),
    )
    if status:
        raise MemoryError("native decode attention: out of memory") if status == -2 else \
            ValueError(f"native decode attention: bad shapes (heads {num_heads}, kv heads {num_kv_heads}, head dim {head_dim})")
    return out
