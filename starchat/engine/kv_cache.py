"""The KV cache: one preallocated tensor cut into fixed-size blocks, handed out to requests.

A request owns a list of blocks; token t of a request lives in slot
`block_ids[t // block_size] * block_size + t % block_size`. Blocks return to the free pool the
moment a request finishes, is cancelled or is preempted.
"""

from __future__ import annotations

from collections import deque

import torch

from starchat.config import ModelConfig


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def grow(self, block_ids: list[int], num_tokens: int) -> bool:
        """Extend `block_ids` to hold num_tokens tokens; False (and nothing taken) if the pool is short."""
        extra = self.blocks_needed(num_tokens) - len(block_ids)
        if extra <= 0:
            return True
        if extra > len(self._free):
            return False
        block_ids.extend(self._free.popleft() for _ in range(extra))
        return True

    def release(self, block_ids: list[int]) -> None:
        self._free.extend(block_ids)
        block_ids.clear()


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    element_size = torch.empty((), dtype=dtype).element_size()
    return config.n_layer * 2 * config.kv_dim * element_size


def allocate_kv_cache(config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Slots index straight into (num_blocks * block_size): no indirection beyond the block table.
    return torch.zeros(config.n_layer, 2, num_blocks * block_size, config.kv_dim, dtype=dtype, device=device)
