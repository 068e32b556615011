"""Decode-only steps of a CPU model in one native call (native/decode_step.c): ids in, logits out.

A step in which every token is a decode (one new token per sequence, the steady state of
generation) runs as a single call: embedding lookups, every block (layer norms, the four
products, the cache write, attention, GELU, residuals), the final layer norm and the lm_head,
in one OpenMP region. The arithmetic is the module path's (gpt_bigcode.py) with a packed CPU
model's activations in float32; steps that carry prefill chunks take the module path. Driven step
by step from Python, the small operations between the products cost 2.5 ms of a 21 ms float16
token of tiny_starcoder on the 2-core CPU of docs/PERFORMANCE.md. The loader attaches it to CPU
models when the native kernels are available, after packing the weights; the runner calls it
the way it replays CUDA graphs on a GPU.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch
from torch import nn

from starchat.model import native
from starchat.model.cpu_linear import PackedEmbedding, PackedLinear
from starchat.model.native.build import Layer, Linear, Model, Step, load


def _linear(module: nn.Module, keep: list) -> Linear:
    if not isinstance(module, PackedLinear):
        raise TypeError(f"fused CPU decode: unexpected layer {type(module).__name__} (the loader packs every Linear first)")
    weight, scales, bias = (None if t is None else t.detach() for t in (module.packed_weight, module.scales, module.bias))
    keep.extend(t for t in (weight, scales, bias) if t is not None)
    return Linear(weight.data_ptr(), native.WEIGHT_TYPES[weight.dtype],
                  scales.data_ptr() if scales is not None else None, bias.data_ptr() if bias is not None else None,
                  module.amx_min_rows)


def _float_vectors(keep: list, *vectors: torch.Tensor) -> list[int]:
    vectors = [v.detach().float().contiguous() for v in vectors]
    keep.extend(vectors)
    return [v.data_ptr() for v in vectors]


def _table(module: nn.Module, keep: list) -> tuple[int, int, int, int]:
    """(address, weight type, packed?, rows) of an embedding table, in any float type."""
    if isinstance(module, PackedEmbedding):  # tied to the lm_head: read from its panels
        table, packed, rows = module.packed_weight.detach(), 1, module.num_embeddings
    else:
        table, packed, rows = module.weight.detach().contiguous(), 0, module.num_embeddings
    if table.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"fused CPU decode: embedding table of {table.dtype}")
    keep.append(table)
    return table.data_ptr(), native.WEIGHT_TYPES[table.dtype], packed, rows


class FusedCpuDecode:
    def __init__(self, model: nn.Module):
        config, transformer = model.config, model.transformer
        self._keep: list[torch.Tensor] = []  # float32 copies and weights the structs point into
        layers = []
        for block in transformer.h:
            norms = _float_vectors(self._keep, block.ln_1.weight, block.ln_1.bias, block.ln_2.weight, block.ln_2.bias)
            products = [_linear(m, self._keep) for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)]
            layers.append(Layer(*norms, *products))
        self._layers = (Layer * len(layers))(*layers)
        attention = transformer.h[0].attn
        token_table, token_type, token_packed, token_rows = _table(transformer.wte, self._keep)
        position_table, position_type, _, position_rows = _table(transformer.wpe, self._keep)
        final_norm = _float_vectors(self._keep, transformer.ln_f.weight, transformer.ln_f.bias)
        self.vocab_size = model.lm_head.out_features
        self._model = Model(
            layers=len(layers), embed=config.n_embd, inner=config.n_inner, qkv=attention.q_size + 2 * attention.kv_size,
            vocab=self.vocab_size, heads=attention.num_heads, kv_heads=attention.num_kv_heads,
            head_dim=attention.head_dim, gelu_tanh=int(config.gelu_tanh),
            eps=config.layer_norm_epsilon, scale=attention.scale,
            token_table=token_table, token_type=token_type, token_table_packed=token_packed, token_rows=token_rows,
            position_table=position_table, position_type=position_type, position_rows=position_rows,
            lnf_weight=final_norm[0], lnf_bias=final_norm[1], lm_head=_linear(model.lm_head, self._keep),
            layer=self._layers,
        )

    def step(self, token_ids: list[int], positions: list[int], block_tables: list[list[int]], kv_cache: torch.Tensor,
             block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step: sequence i's token token_ids[i] at positions[i], its cache in blocks
        block_tables[i] (kv_cache: (n_layer, 2, num_slots, kv_dim)). Writes the new keys and values
        to the cache; returns the (rows, vocab) float32 logits and each row's argmax (rows,) int64,
        the greedy tokens, computed while the logits are still in cache."""
        rows = len(token_ids)
        if kv_cache.dim() != 4 or kv_cache.shape[0] != self._model.layers or not kv_cache.is_contiguous():
            raise ValueError(f"fused CPU decode: cache of shape {tuple(kv_cache.shape)} for {self._model.layers} layers")
        # Inputs as NumPy arrays: microseconds, where a dozen small PyTorch tensors cost ~0.3 ms.
        ids = np.array(token_ids, dtype=np.int64)
        where = np.array(positions, dtype=np.int64)
        max_blocks = max(len(table) for table in block_tables)
        tables = np.zeros((rows, max_blocks), dtype=np.int64)
        for row, table in enumerate(block_tables):
            tables[row, :len(table)] = table
        logits = torch.empty(rows, self.vocab_size, dtype=torch.float32)
        greedy = torch.empty(rows, dtype=torch.int64)
        step = Step(rows=rows, token_ids=ids.ctypes.data, positions=where.ctypes.data, block_table=tables.ctypes.data,
                    max_blocks=max_blocks, block_size=block_size, cache=kv_cache.data_ptr(),
                    cache_type=native.CACHE_TYPES[kv_cache.dtype], num_slots=kv_cache.shape[2])
        status = load().starchat_decode_step(ctypes.byref(self._model), ctypes.byref(step), logits.data_ptr(),
                                             greedy.data_ptr(), torch.get_num_threads())
        if status == -1:
            raise ValueError("fused CPU decode: a token id, position or cache block is out of range")
        if status:
            raise MemoryError("fused CPU decode: out of memory for the step's buffers")
        return logits, greedy


def attach_fused_decode(model: nn.Module) -> None:
    """Give a built CPU model its fused decode step (when the native kernels are available)."""
    model.fused_decode = FusedCpuDecode(model) if native.available() else None
