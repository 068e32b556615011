"""Frozen configuration: what the checkpoint is (ModelConfig) and how the engine runs it (EngineConfig)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu", "gelu_new", "gelu_fast")


class ModelConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ModelConfig:
    """The GPTBigCode hyper-parameters the network needs, read from a Hugging Face config.json."""

    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    multi_query: bool = True
    activation_function: str = "gelu_pytorch_tanh"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    tie_word_embeddings: bool = True
    bos_token_id: int = 0
    eos_token_id: int = 0
    torch_dtype: str | None = None

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def num_kv_heads(self) -> int:
        return 1 if self.multi_query else self.n_head

    @property
    def kv_dim(self) -> int:
        """Width of one cached key (or value) row: all KV heads of one token."""
        return self.num_kv_heads * self.head_dim

    @property
    def gelu_tanh(self) -> bool:
        """gelu_pytorch_tanh, gelu_new and gelu_fast are all the tanh approximation; "gelu" is exact."""
        return self.activation_function != "gelu"

    def num_parameters(self) -> int:
        per_layer = (
            2 * self.n_embd  # ln_1
            + self.n_embd * (self.n_embd + 2 * self.kv_dim) + (self.n_embd + 2 * self.kv_dim)  # c_attn
            + self.n_embd * self.n_embd + self.n_embd  # attn c_proj
            + 2 * self.n_embd  # ln_2
            + self.n_embd * self.n_inner + self.n_inner  # c_fc
            + self.n_inner * self.n_embd + self.n_embd  # mlp c_proj
        )
        embeddings = self.vocab_size * self.n_embd + self.n_positions * self.n_embd
        lm_head = 0 if self.tie_word_embeddings else self.vocab_size * self.n_embd
        return embeddings + self.n_layer * per_layer + 2 * self.n_embd + lm_head

    @classmethod
    def from_dict(cls, data: dict, source: str = "config.json") -> "ModelConfig":
        model_type = data.get("model_type")
        if model_type != "gpt_bigcode":
            raise ModelConfigError(
                f"{source}: model_type is {model_type!r}, but starchat runs GPTBigCode checkpoints "
                "(model_type 'gpt_bigcode': StarChat, StarCoder, StarCoderPlus, SantaCoder-style); pick such a model"
            )
        try:
            n_embd = int(data["n_embd"])
            n_head = int(data["n_head"])
            config = cls(
                vocab_size=int(data["vocab_size"]),
                n_positions=int(data.get("n_positions", 2048)),
                n_embd=n_embd,
                n_layer=int(data["n_layer"]),
                n_head=n_head,
                n_inner=int(data.get("n_inner") or 4 * n_embd),
                multi_query=bool(data.get("multi_query", True)),
                activation_function=str(data.get("activation_function", "gelu_pytorch_tanh")),
                layer_norm_epsilon=float(data.get("layer_norm_epsilon", 1e-5)),
                scale_attn_weights=bool(data.get("scale_attn_weights", True)),
                tie_word_embeddings=bool(data.get("tie_word_embeddings", True)),
                bos_token_id=_first_int(data.get("bos_token_id"), 0),
                eos_token_id=_first_int(data.get("eos_token_id"), 0),
                torch_dtype=data.get("torch_dtype") or data.get("dtype"),
            )
        except KeyError as missing:
            raise ModelConfigError(f"{source}: the field {missing} is missing; is this a complete GPTBigCode config.json?") from None
        if n_embd % n_head:
            raise ModelConfigError(f"{source}: n_embd {n_embd} is not a multiple of n_head {n_head}")
        if config.activation_function not in SUPPORTED_ACTIVATIONS:
            raise ModelConfigError(
                f"{source}: activation_function {config.activation_function!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})"
            )
        return config

    @classmethod
    def from_file(cls, path: Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise ModelConfigError(f"{path}: missing; a model folder needs the config.json of a Hugging Face checkpoint")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ModelConfigError(f"{path}: not valid JSON ({error}); re-download or fix the file") from None
        return cls.from_dict(data, source=str(path))

    def to_hf_dict(self) -> dict:
        return {
            "architectures": ["GPTBigCodeForCausalLM"],
            "model_type": "gpt_bigcode",
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": self.n_inner,
            "multi_query": self.multi_query,
            "activation_function": self.activation_function,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "scale_attn_weights": self.scale_attn_weights,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_softmax_in_fp32": True,
            "scale_attention_softmax_in_fp32": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "use_cache": True,
        }


def _first_int(value, default: int) -> int:
    if isinstance(value, list):
        value = value[0] if value else None
    return default if value is None else int(value)


# Named shapes for benchmarks and tests (random weights). Vocab sizes as the real checkpoints.
NAMED_SHAPES: dict[str, dict] = {
    "starchat-beta": dict(vocab_size=49156, n_positions=8192, n_embd=6144, n_layer=40, n_head=48, n_inner=24576),
    "starcoder": dict(vocab_size=49152, n_positions=8192, n_embd=6144, n_layer=40, n_head=48, n_inner=24576),
    "tiny_starcoder": dict(vocab_size=49152, n_positions=8192, n_embd=768, n_layer=20, n_head=12, n_inner=3072),
}



def linear_weight_shapes(shape: dict) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of one block's Linear layers and of the lm_head, for a named shape."""
    embd, inner = shape["n_embd"], shape.get("n_inner") or 4 * shape["n_embd"]
    kv = embd // shape["n_head"] * (1 if shape.get("multi_query", True) else shape["n_head"])
    return {"c_attn": (embd + 2 * kv, embd), "attn.c_proj": (embd, embd), "c_fc": (inner, embd),
            "mlp.c_proj": (embd, inner), "lm_head": (shape["vocab_size"], embd)}

@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model. None means: derive from the model and the machine."""

    model: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_model_len: int | None = None  # context length; default: the checkpoint's n_positions
    kv_cache_memory_bytes: int | None = None  # KV-cache budget; default: sized from the machine
    kv_block_size: int = 16  # tokens per cache block
    max_num_seqs: int = 64  # sequences in the running batch at most
    # Tokens per engine step (decode tokens + prefill chunks); None: 512 on a CPU, 2048 on a GPU
    # (engine/devices.py, default_batched_tokens)
    max_num_batched_tokens: int | None = None
    revision: str | None = None  # Hub revision when `model` is a Hub id
    quantize: str | None = None  # None | "int8" (weight-only, per-channel scales)
    cuda_graphs: bool = True  # on a GPU, replay decode steps as CUDA graphs (False: eager, for debugging)
    # Detokenize a step's tokens while the next step runs (None: on a GPU only); deltas then come
    # out one step() later, the tokens are the same
    overlap_host_work: bool | None = None
    load_format: str = "auto"  # auto: the checkpoint's weights; random: seeded random weights of its config (benchmarks)
    # Reuse the cached keys and values of a prompt's longest already-computed prefix, in whole
    # cache blocks (engine/kv_cache.py): a shared system prompt or a chat's earlier turns are
    # computed once
    enable_prefix_caching: bool = True
    # Speculative decoding with n-gram drafts from the sequence itself (engine/speculative.py): up
    # to this many drafted tokens verified per step (greedy requests, and sampling ones without a
    # seed: a seed's draws are only reproducible without drafts); 0 = off. Only while at
    # most `speculative_max_running` requests run (beyond, a step is no longer bound by reading
    # the weights, and verifying drafts costs compute the batch needs).
    num_speculative_tokens: int = 0
    speculative_max_running: int = 4
    extra: dict = field(default_factory=dict)
