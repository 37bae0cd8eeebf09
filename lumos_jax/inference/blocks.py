"""Host-side bookkeeping of the paged KV cache: a pool of fixed-size blocks.

Every block is in one of three states: free (no useful content), in use (reference count
> 0: some rows' block tables point at it), or cached (count 0 but its content is a known,
registered prefix; kept in LRU order and handed out again only when no free block is
left). A full block is registered under the hash of (its parent block's hash, its tokens),
so identical token prefixes of any two sessions map to the same blocks and are stored
and computed once. Only full blocks are ever registered or shared; a row only writes into
its own unshared last block, so shared blocks are read-only.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from typing import Sequence

import numpy as np

ROOT_KEY = b""


def block_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Content hash of a full block given its parent's key (a 128-bit chain hash)."""
    data = parent + np.asarray(tokens, np.int64).tobytes()
    return hashlib.blake2b(data, digest_size=16).digest()


class BlockPool:
    """Reference-counted blocks with a prefix hash table and an LRU of cached blocks."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"BlockPool: num_blocks={num_blocks} must be >= 1")
        self.num_blocks = num_blocks
        self.refs = np.zeros(num_blocks, np.int64)
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()   # count 0, registered; LRU first
        self._by_key: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}

    @property
    def available(self) -> int:
        """Blocks that `alloc` can hand out now (free + cached)."""
        return len(self._free) + len(self._cached)

    @property
    def used(self) -> int:
        return self.num_blocks - self.available

    @property
    def cached(self) -> int:
        return len(self._cached)

    def alloc(self) -> int | None:
        """A block with count 1 and no registered content, or None if every block is in use.
        Free blocks go first; then the least recently used cached block is reclaimed."""
        if self._free:
            block = self._free.popleft()
        elif self._cached:
            block, _ = self._cached.popitem(last=False)
            self.unregister(block)
        else:
            return None
        self.refs[block] = 1
        return block

    def incref(self, block: int) -> None:
        if self.refs[block] == 0:
            self._cached.pop(block)        # only registered blocks sit at count 0 outside _free
        self.refs[block] += 1

    def decref(self, block: int) -> None:
        if self.refs[block] <= 0:
            raise RuntimeError(f"BlockPool: block {block} released more often than taken")
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self._key_of:
                self._cached[block] = None  # most recently used end
            else:
                self._free.append(block)

    def lookup(self, key: bytes) -> int | None:
        return self._by_key.get(key)

    def register(self, block: int, key: bytes) -> bool:
        """Record that `block` holds the prefix `key`. False (nothing changes) when that
        prefix is already stored in another block or this block holds another prefix."""
        if key in self._by_key or block in self._key_of:
            return False
        self._by_key[key] = block
        self._key_of[block] = key
        return True

    def unregister(self, block: int) -> None:
        key = self._key_of.pop(block, None)
        if key is not None:
            del self._by_key[key]
            if self.refs[block] == 0 and block in self._cached:
                del self._cached[block]
                self._free.append(block)

    def is_registered(self, block: int) -> bool:
        return block in self._key_of
