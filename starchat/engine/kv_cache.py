"""The KV cache: one preallocated tensor cut into fixed-size blocks, handed out to requests.

A request owns a list of blocks; token t of a request lives in slot
`block_ids[t // block_size] * block_size + t % block_size`.

Prefix caching: a block is registered, once a step that fills it is scheduled, under a hash of
its tokens and of every token before it (`block_hashes`); a later request whose prompt starts with
the same tokens takes those blocks as they are (reference-counted, read-only: a request writes
only positions past its cached prefix) and computes from there. Keys and values depend on the
absolute position, and the hash chain fixes it. A registered block nobody holds stays filled,
in least-recently-released order, until a block is needed and no empty one is left.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from typing import Callable, Sequence

import torch

from starchat.config import ModelConfig
from starchat.engine.host_memory import lazy_zeros


def block_hashes(hashes: list[bytes], token_at: Callable[[int], int], block_size: int, num_blocks: int) -> list[bytes]:
    """Extend `hashes` (of a sequence's first blocks) to its first `num_blocks` full blocks.

    Block i's hash covers its tokens and block i-1's hash, so equal hashes mean equal tokens from
    position 0 on (a 128-bit digest: a collision is not a practical concern)."""
    while len(hashes) < num_blocks:
        start = len(hashes) * block_size
        tokens = array("q", [token_at(position) for position in range(start, start + block_size)])
        parent = hashes[-1] if hashes else b""
        hashes.append(hashlib.blake2b(parent + tokens.tobytes(), digest_size=16).digest())
    return hashes


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._empty: deque[int] = deque(range(num_blocks))  # blocks holding nothing reusable
        self._holders = [0] * num_blocks  # requests holding each block
        self._block_of_hash: dict[bytes, int] = {}
        self._hash_of_block: dict[int, bytes] = {}
        # Registered blocks no request holds, least recently released first: evicted in that order.
        self._idle: OrderedDict[int, None] = OrderedDict()

    @property
    def num_free_blocks(self) -> int:
        """Blocks a request can take: empty ones and idle cached ones (evicted on demand)."""
        return len(self._empty) + len(self._idle)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Registered blocks, held or idle."""
        return len(self._hash_of_block)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def grow(self, block_ids: list[int], num_tokens: int) -> bool:
        """Extend `block_ids` to hold num_tokens tokens; False (and nothing taken) if the pool is short."""
        extra = self.blocks_needed(num_tokens) - len(block_ids)
        if extra <= 0:
            return True
        if extra > self.num_free_blocks:
            return False
        block_ids.extend(self._take() for _ in range(extra))
        return True

    def _take(self) -> int:
        if self._empty:
            block = self._empty.popleft()
        else:  # evict the least recently released cached block
            block, _ = self._idle.popitem(last=False)
            del self._block_of_hash[self._hash_of_block.pop(block)]
        self._holders[block] = 1
        return block

    def release(self, block_ids: list[int]) -> None:
        # Last blocks first: a sequence's tail is the part least likely to be shared, so it is
        # evicted before its head.
        for block in reversed(block_ids):
            self._holders[block] -= 1
            if self._holders[block] == 0:
                if block in self._hash_of_block:
                    self._idle[block] = None
                else:
                    self._empty.append(block)
        block_ids.clear()

    def take_cached(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes`, now also held by the caller."""
        blocks = []
        for block_hash in hashes:
            block = self._block_of_hash.get(block_hash)
            if block is None:
                break
            if self._holders[block] == 0:
                del self._idle[block]
            self._holders[block] += 1
            blocks.append(block)
        return blocks

    def forget_cached(self) -> None:
        """Unregister every block: idle ones become empty, held ones are freed as unregistered."""
        self._empty.extend(self._idle)
        self._idle.clear()
        self._block_of_hash.clear()
        self._hash_of_block.clear()

    def register(self, block: int, block_hash: bytes) -> None:
        """Offer a held, fully computed block for reuse. A block already cached under that hash
        (the same tokens computed twice at once) keeps the entry; this one is freed normally."""
        if block_hash not in self._block_of_hash and block not in self._hash_of_block:
            self._block_of_hash[block_hash] = block
            self._hash_of_block[block] = block_hash


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    element_size = torch.empty((), dtype=dtype).element_size()
    return config.n_layer * 2 * config.kv_dim * element_size


def allocate_kv_cache(config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Slots index straight into (num_blocks * block_size): no indirection beyond the block table.
    shape = (config.n_layer, 2, num_blocks * block_size, config.kv_dim)
    if device.type == "cpu":  # faulted in as written, in 2 MiB pages where the host allows them (host_memory.py)
        return lazy_zeros(shape, dtype)
    return torch.zeros(shape, dtype=dtype, device=device)
