"""Decode-only steps of a CPU model through native/decode_layer.c: one call per block.

A step in which every token is a decode (one new token per sequence, the steady state of
generation) runs each GPTBigCode block as one native call: layer norms, the four products,
the cache write, attention, GELU and residuals, with one OpenMP region per block instead of a
dozen PyTorch operations. The arithmetic is the module path's (gpt_bigcode.py), with the
residual stream in float32; steps that carry prefill chunks use the module path. The loader
attaches it to CPU models when the native kernels are available, after packing the weights.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from starchat.model import native
from starchat.model.attention import AttentionMetadata
from starchat.model.cpu_linear import PackedLinear
from starchat.model.native.build import Block, Linear, load


def _linear(module: nn.Module, keep: list) -> Linear:
    if not isinstance(module, PackedLinear):
        raise TypeError(f"fused CPU decode: unexpected layer {type(module).__name__} (the loader packs every Linear first)")
    weight, scales, bias = (None if t is None else t.detach() for t in (module.packed_weight, module.scales, module.bias))
    keep.extend(t for t in (weight, scales, bias) if t is not None)
    return Linear(weight.data_ptr(), native.WEIGHT_TYPES[weight.dtype],
                  scales.data_ptr() if scales is not None else None, bias.data_ptr() if bias is not None else None)


class FusedCpuDecode:
    def __init__(self, model: nn.Module):
        config = model.config
        self._keep: list[torch.Tensor] = []  # float32 copies and weights the structs point into
        self._blocks: list[Block] = []
        for block in model.transformer.h:
            attention, mlp = block.attn, block.mlp
            vectors = [block.ln_1.weight, block.ln_1.bias, block.ln_2.weight, block.ln_2.bias]
            vectors = [v.detach().float().contiguous() for v in vectors]
            self._keep.extend(vectors)
            layers = [_linear(m, self._keep) for m in (attention.c_attn, attention.c_proj, mlp.c_fc, mlp.c_proj)]
            self._blocks.append(Block(
                embed=config.n_embd, inner=config.n_inner, qkv=attention.q_size + 2 * attention.kv_size,
                ln1_weight=vectors[0].data_ptr(), ln1_bias=vectors[1].data_ptr(),
                ln2_weight=vectors[2].data_ptr(), ln2_bias=vectors[3].data_ptr(), eps=config.layer_norm_epsilon,
                c_attn=layers[0], attn_proj=layers[1], c_fc=layers[2], mlp_proj=layers[3],
                gelu_tanh=int(config.activation_function != "gelu"), heads=attention.num_heads,
                kv_heads=attention.num_kv_heads, head_dim=attention.head_dim, scale=attention.scale,
            ))
        self._scratch_per_row = 2 * config.n_embd + self._blocks[0].qkv + max(config.n_inner, config.n_embd)

    def applies(self, metadata: AttentionMetadata, rows: int) -> bool:
        return not metadata.prefill_chunks and 0 < rows == metadata.num_decode_tokens

    def __call__(self, hidden: torch.Tensor, metadata: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        """hidden (rows, C) embeddings -> (rows, C) float32 output of the last block."""
        library = load()
        rows = hidden.shape[0]
        hidden = hidden.float().contiguous()  # a fresh tensor: updated in place below
        scratch = torch.empty(rows * self._scratch_per_row, dtype=torch.float32)
        write_slots = metadata.slot_mapping.contiguous()
        read_slots = metadata.decode_gather_slots.contiguous()
        mask = metadata.decode_mask.contiguous()
        cache_type = native.CACHE_TYPES[kv_cache.dtype]
        threads = torch.get_num_threads()
        for layer_index, block in enumerate(self._blocks):
            layer_cache = kv_cache[layer_index]
            block.rows, block.max_len = rows, read_slots.shape[1]
            block.cache_keys, block.cache_values = layer_cache[0].data_ptr(), layer_cache[1].data_ptr()
            block.cache_type = cache_type
            block.write_slots, block.read_slots, block.mask = write_slots.data_ptr(), read_slots.data_ptr(), mask.data_ptr()
            if library.starchat_decode_block(ctypes.byref(block), hidden.data_ptr(), scratch.data_ptr(), threads):
                raise MemoryError("fused CPU decode: out of memory for attention scratch")
        return hidden


def attach_fused_decode(model: nn.Module) -> None:
    """Give a built CPU model its fused decode path (when the native kernels are available)."""
    model.fused_decode = FusedCpuDecode(model) if native.available() else None
