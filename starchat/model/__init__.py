"""The GPTBigCode network and checkpoint loading. Knows nothing of requests or scheduling."""

from starchat.model.attention import AttentionMetadata, PrefillChunk
from starchat.model.gpt_bigcode import GPTBigCodeForCausalLM

__all__ = ["AttentionMetadata", "PrefillChunk", "GPTBigCodeForCausalLM"]
