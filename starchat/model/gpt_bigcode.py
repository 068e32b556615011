"""GPTBigCode (StarCoder / StarChat) for inference: learned positions, pre-LayerNorm, fused QKV.

One forward path for prefill and decode: `forward(token_ids, positions, metadata, kv_cache)`
over a flat batch of new tokens, then `compute_logits` on the rows that need a next token.
Parameter names match Hugging Face checkpoints (`transformer.h.0.attn.c_attn.weight`, ...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from starchat.config import ModelConfig
from starchat.model import native, triton_layer_norm
from starchat.model.attention import AttentionMetadata, PromptAttention, paged_attention


def activation(config: ModelConfig):
    return (lambda x: F.gelu(x, approximate="tanh")) if config.gelu_tanh else F.gelu


def add_and_norm(hidden: torch.Tensor, delta: torch.Tensor | None, norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden + delta, norm(hidden + delta)): the residual stream and the next sublayer's input.
    On a GPU one Triton kernel (triton_layer_norm.py); on a CPU with float32 activations the native
    kernel's single pass (which adds delta into hidden in place: callers rebind hidden); elsewhere
    PyTorch's add and LayerNorm."""
    if triton_layer_norm.supports(hidden):
        return triton_layer_norm.add_layer_norm(hidden, delta, norm.weight, norm.bias, norm.eps)
    summed_and_normed = native.try_add_layer_norm_(hidden, delta, norm.weight, norm.bias, norm.eps)
    if summed_and_normed is not None:
        return summed_and_normed
    if delta is not None:
        hidden = hidden + delta
    return hidden, norm(hidden)


class Attention(nn.Module):
    # Set by the loader on a CPU: prompt chunks on AMX tiles, or in bfloat16 SDPA where that runs
    # faster than the activations' float32 (loader.choose_prompt_attention).
    prompt_attention: PromptAttention = PromptAttention()

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.n_head
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.n_embd
        self.kv_size = config.kv_dim
        self.scale = 1.0 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
        # Fused projection laid out [query (H*D) | key (KVH*D) | value (KVH*D)]; multi-head
        # checkpoints interleave per head and are reordered to this layout by the loader.
        self.c_attn = nn.Linear(config.n_embd, self.q_size + 2 * self.kv_size)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, hidden: torch.Tensor, metadata: AttentionMetadata, layer_cache: torch.Tensor) -> torch.Tensor:
        qkv = self.c_attn(hidden)  # (T, H*D + 2*KVH*D)
        query, key, value = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        attended = paged_attention(
            query, key, value, layer_cache, metadata, self.num_heads, self.num_kv_heads, self.scale,
            self.prompt_attention,
        )  # (T, H*D)
        return self.c_proj(attended)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd)
        self.act = activation(config)
        self.gelu_tanh = config.gelu_tanh
        # Set by tuned_linear.fuse_gelu_into_products on a GPU, cpu_linear.compute_in_float32 on a
        # CPU: c_fc then applies the tanh GELU in its product's epilogue (no separate pass over the
        # widest activations of the block).
        self.fused_activation = False

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.fused_activation:
            return self.c_proj(self.c_fc(hidden, gelu_tanh=True))
        return self.c_proj(self.act(self.c_fc(hidden)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, hidden: torch.Tensor, delta: torch.Tensor | None, metadata: AttentionMetadata,
                layer_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Takes the residual stream and the previous sublayer's output not yet added to it; returns
        the same pair for the next block. Each add shares a kernel with the norm after it."""
        hidden, normed = add_and_norm(hidden, delta, self.ln_1)
        hidden, normed = add_and_norm(hidden, self.attn(normed, metadata, layer_cache), self.ln_2)
        return hidden, self.mlp(normed)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class GPTBigCodeForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        # On a CPU the loader attaches cpu_decode.FusedCpuDecode: the runner then runs decode-only
        # steps as one native call (same arithmetic, activations in float32).
        self.fused_decode = None

    @torch.inference_mode()
    def forward(
        self,
        token_ids: torch.Tensor,  # (T,)
        positions: torch.Tensor,  # (T,)
        metadata: AttentionMetadata,
        kv_cache: torch.Tensor,  # (n_layer, 2, num_slots, kv_dim)
    ) -> torch.Tensor:  # (T, C)
        hidden, delta = self.transformer.wte(token_ids), self.transformer.wpe(positions)
        for layer_index, block in enumerate(self.transformer.h):
            hidden, delta = block(hidden, delta, metadata, kv_cache[layer_index])
        return add_and_norm(hidden, delta, self.transformer.ln_f)[1]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # (N, C) -> (N, V) float32
        return self.lm_head(hidden).float()
