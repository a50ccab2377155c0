"""The KV block pool: ref-counted blocks, a free list in LRU order, and the prefix cache over it.

A full block is named by a chained hash of its tokens (its parent's hash and its own token ids) and
keeps its token ids, so a hit is exact even if two hashes collide. Cached blocks that nobody
references stay in the free list and are evicted least-recently-freed first, only when needed.
A `BlockListener` hears each block named (stored) and each named block reused (evicted): how routers
learn which prefixes this engine holds (kv_events.py, server/kv_events.py).

With sliding-window attention in every layer, a running sequence gives back its leading blocks once no
later query can see them (all their tokens before `num_computed_tokens - window + 1`), so a long generation
holds a bounded number of blocks. Their table entries stay as placeholders (attention never reads them) so
a token's block is still `block_table[position // block_size]`; named blocks keep their name in the free
list, as any freed block does, and stay prefix-cache hits until evicted (no event: they are still held).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from kvpilot.engine.block_hash import chain_hash
from kvpilot.engine.request import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None


class BlockListener(Protocol):
    """Called on the engine's step thread, once per block and in order; must be quick and never raise."""

    def stored(self, block_hash: int) -> None: ...

    def evicted(self, block_hash: int) -> None: ...


# The table entry of a block given back behind the window: a valid block id, never read.
RELEASED = 0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool,
                 window: int | None = None) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.window = window
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.num_empty_blocks = num_blocks  # free blocks holding no cached prefix (a router's room to place one)
        self.cached: dict[int, int] = {}
        self.prefix_queries = 0  # prompt tokens looked up, as vLLM counts them
        self.prefix_hits = 0  # of those, tokens found in the cache
        self.listener: BlockListener | None = None

    # ---- accounting -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def max_blocks_per_seq(self, max_step_tokens: int) -> int | None:
        """The most blocks one sequence holds at once under the window (None: its whole context).

        At a step computing n tokens from position c it holds the blocks of positions c - window + 1 .. c + n - 1.
        """
        if self.window is None:
            return None
        return (self.window + max_step_tokens - 2) // self.block_size + 2

    # ---- prefix cache -----------------------------------------------------------------------
    def _block_tokens(self, seq: Sequence, index: int) -> tuple[int, ...]:
        bs = self.block_size
        return tuple(seq.token_ids[index * bs : (index + 1) * bs])

    def block_hash(self, seq: Sequence, index: int) -> int:
        while len(seq.block_hashes) <= index:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[i - 1] if i else None
            seq.block_hashes.append(chain_hash(parent, self._block_tokens(seq, i)))
        return seq.block_hashes[index]

    def _lookup(self, seq: Sequence, index: int) -> int | None:
        block_id = self.cached.get(self.block_hash(seq, index))
        if block_id is None or self.blocks[block_id].token_ids != self._block_tokens(seq, index):
            return None
        return block_id

    def released_in_hit(self, num_blocks: int) -> int:
        """Leading blocks of a prefix hit of `num_blocks` blocks that its first new query cannot see."""
        if self.window is None:
            return 0
        return max(0, num_blocks * self.block_size - self.window + 1) // self.block_size

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks covering the sequence's leading full blocks; the last token is always recomputed.

        Under a sliding window only the blocks the first new query sees must be cached (a block's hash names its
        whole prefix): the longest such prefix wins, its unseen leading blocks RELEASED placeholders.
        """
        if not self.enable_prefix_caching:
            return []
        full = (seq.num_tokens - 1) // self.block_size
        hits: list[int | None] = []
        best = run = 0
        for index in range(full):
            block_id = self._lookup(seq, index)
            if block_id is None and self.window is None:
                break
            hits.append(block_id)
            run = run + 1 if block_id is not None else 0
            if run >= index + 1 - self.released_in_hit(index + 1):
                best = index + 1
        released = self.released_in_hit(best)
        return [RELEASED] * released + [b for b in hits[released:best] if b is not None]

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Name every block the sequence has filled with computed tokens, so others can share it.

        A block holding a token still on the GPU (async scheduling) waits: its name needs every token id.
        """
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens, seq.num_known_tokens) // self.block_size
        for index in range(max(seq.num_cached_blocks, seq.num_released_blocks), full):
            block = self.blocks[seq.block_table[index]]
            if block.block_hash is not None:
                continue
            block_hash = self.block_hash(seq, index)
            if block_hash in self.cached:  # an identical block was computed concurrently; keep that one
                continue
            block.block_hash, block.token_ids = block_hash, self._block_tokens(seq, index)
            self.cached[block_hash] = block.block_id
            if self.listener is not None:
                self.listener.stored(block_hash)
        seq.num_cached_blocks = max(seq.num_cached_blocks, full)

    # ---- allocation -------------------------------------------------------------------------
    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
            if block.block_hash is None:
                self.num_empty_blocks -= 1
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is None:
            self.num_empty_blocks -= 1
        else:  # evict from the prefix cache
            del self.cached[block.block_hash]
            if self.listener is not None:
                self.listener.evicted(block.block_hash)
            block.block_hash, block.token_ids = None, None
        block.ref_count = 1
        return block_id

    def can_allocate(self, seq: Sequence, num_new_tokens: int, shared: list[int] | None = None) -> bool:
        """Whether `num_new_tokens` more fit, after adopting `shared` blocks (which may sit in the free list)."""
        shared = shared or []
        table = len(seq.block_table) + len(shared)
        computed = len(shared) * self.block_size if shared else seq.num_computed_tokens
        needed = self.blocks_for(computed + num_new_tokens) - table
        held = shared[self.released_in_hit(len(shared)) :]
        reclaimable = sum(1 for b in held if self.blocks[b].ref_count == 0)
        return needed <= len(self.free) - reclaimable

    def share(self, seq: Sequence, block_ids: list[int]) -> None:
        """Adopt already-computed blocks (prefix hits or a parent sample's prompt), placeholders left as they are."""
        released = self.released_in_hit(len(block_ids))
        for block_id in block_ids[released:]:
            self._take(block_id)
        seq.block_table.extend(block_ids)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        seq.num_cached_blocks = len(seq.block_table)
        seq.num_released_blocks = released

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if needed > len(self.free):
            raise RuntimeError("allocate() called without can_allocate(): the scheduler's invariant broke")
        seq.block_table.extend(self._pop_free() for _ in range(needed))

    def release_outside_window(self, seq: Sequence) -> int:
        """Give back the leading blocks no query from `num_computed_tokens` on can see; returns how many."""
        if self.window is None:
            return 0
        first_seen = max(0, seq.num_computed_tokens - self.window + 1)
        end = min(first_seen // self.block_size, len(seq.block_table))
        start = seq.num_released_blocks
        for index in range(start, end):
            self._release(seq.block_table[index])
            seq.block_table[index] = RELEASED
        seq.num_released_blocks = max(start, end)
        seq.num_cached_blocks = max(seq.num_cached_blocks, seq.num_released_blocks)
        return max(0, end - start)

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count < 0:
            raise RuntimeError(f"block {block_id} freed more often than taken")
        if block.ref_count == 0:
            self.free[block_id] = None
            if block.block_hash is None:  # nothing to keep: reuse these first
                self.free.move_to_end(block_id, last=False)
                self.num_empty_blocks += 1

    def free_seq(self, seq: Sequence) -> None:
        """Drop the sequence's references; tail blocks go first to the eviction end."""
        for block_id in reversed(seq.block_table[seq.num_released_blocks :]):
            self._release(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_cached_blocks = 0
        seq.num_released_blocks = 0

    def record_lookup(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_prompt_tokens
        self.prefix_hits += num_hit_tokens
