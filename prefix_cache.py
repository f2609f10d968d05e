"""Automatic prefix caching: the KV of earlier prompts, kept in fixed-size token blocks, so a
request whose prompt begins like an earlier one prefills only the rest.

An editor sends a new completion request every few keystrokes, each repeating almost the
whole previous prompt; without reuse every request prefills the whole file prefix again.

Design (why a separate block pool, not blocks pinned inside the KV slots):
  The engine's KV cache is static, one slot per running request (model.KVCache). Finished
  prompts' blocks are *copied* into a pool of their own, and copied back into a request's slot
  when it starts. Copying a block's KV costs a memory copy; recomputing it costs a forward pass
  of every layer, so the copy is far cheaper. In exchange:
  - the cache's size is its own setting (bytes), not max_batch: 128 typing users keep their
    prefixes cached on a server with 32 slots;
  - nothing outside the pool ever points into it: a running request reads pool blocks only
    while they are copied into its slot, at admission, so eviction can never change the KV a
    running request attends to. The only pins are the ones a store holds on the chain it is
    extending (an eviction made to room a new block must not take that block's parent);
  - the KV is moved bit for bit, and only KV that prefill computed is cached (never decode's,
    whose kernels round differently), so a hit attends to exactly what a prefill produced.

Blocks are keyed by a chain hash: the hash of the whole prefix up to and including the block
(hash of the parent's key and the block's tokens), so equal tokens after a different prefix
are a different block. A hit is checked against the stored tokens and the parent block, so a
hash collision is a miss, never wrong KV.

Eviction is LRU over leaf blocks (a block whose children are cached is worth at least as much
as they are). Lookups touch a chain deepest block first, so an ancestor is always at least as
recent as its descendants and the least recent block is a leaf.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

import torch

from model import host_to_device

ROOT_KEY = 0  # the chain hash "parent" of a prompt's first block
MIB = 1 << 20


def chain_hash(parent_key: int, tokens: tuple[int, ...]) -> int:
    """Key of a block: depends on every token of the prefix through the parent's key.
    Python's tuple hash of ints is deterministic (no per-process salt) and fast."""
    return hash((parent_key, tokens))


@dataclass(eq=False)  # identity semantics: a Block is a node, found by key, compared by `is`
class Block:
    row: int  # where its KV lives in the pool
    key: int
    tokens: tuple[int, ...]
    parent: Block | None
    children: int = 0
    pins: int = 0


class BlockIndex:
    """Which token blocks are cached and where: lookup, insertion, LRU eviction. No tensors."""

    def __init__(self, capacity: int, block_tokens: int):
        if capacity < 1 or block_tokens < 1:
            raise ValueError(f"a block index needs capacity >= 1 and block_tokens >= 1, got {capacity}, {block_tokens}")
        self.capacity, self.block_tokens = capacity, block_tokens
        self._by_key: dict[int, Block] = {}
        self._lru: collections.OrderedDict[Block, None] = collections.OrderedDict()  # least recent first
        self._free_rows = list(range(capacity - 1, -1, -1))
        self.evictions = 0

    @property
    def used(self) -> int:
        return len(self._lru)

    def full_blocks(self, tokens: list[int]) -> list[tuple[int, ...]]:
        bt = self.block_tokens
        return [tuple(tokens[i : i + bt]) for i in range(0, len(tokens) - bt + 1, bt)]

    def match(self, tokens: list[int]) -> list[Block]:
        """The cached blocks that begin `tokens`, longest chain first to last."""
        chain: list[Block] = []
        key, parent = ROOT_KEY, None
        for piece in self.full_blocks(tokens):
            key = chain_hash(key, piece)
            block = self._by_key.get(key)
            if block is None or block.parent is not parent or block.tokens != piece:
                break  # not cached, or a hash collision: the tokens decide
            chain.append(block)
            parent = block
        return chain

    def touch(self, chain: list[Block]) -> None:
        """Mark as just used, deepest first, so ancestors stay more recent than descendants."""
        for block in reversed(chain):
            self._lru.move_to_end(block)

    def extend(self, chain: list[Block], tokens: list[int]) -> list[Block]:
        """New blocks for the full blocks of `tokens` after `chain` (which must be match(tokens)),
        evicting least recently used leaves for room. Fewer (maybe none) when every block
        is pinned or in the chain, or a hash collides with a different cached block."""
        new: list[Block] = []
        parent = chain[-1] if chain else None
        self.pin(chain)
        try:
            for piece in self.full_blocks(tokens)[len(chain) :]:
                key = chain_hash(parent.key if parent else ROOT_KEY, piece)
                if key in self._by_key or not self._make_room():
                    break  # a collision: the cached block keeps its key; stop here
                block = Block(self._free_rows.pop(), key, piece, parent, pins=1)  # pinned: the next one's parent
                self._by_key[key] = block
                self._lru[block] = None
                if parent is not None:
                    parent.children += 1
                new.append(block)
                parent = block
        finally:
            self.unpin(chain)
            self.unpin(new)
        return new

    def pin(self, blocks: list[Block]) -> None:
        for block in blocks:
            block.pins += 1

    def unpin(self, blocks: list[Block]) -> None:
        for block in blocks:
            block.pins -= 1

    def _make_room(self) -> bool:
        if self._free_rows:
            return True
        victim = next((b for b in self._lru if b.children == 0 and b.pins == 0), None)
        if victim is None:
            return False
        self._evict(victim)
        return True

    def _evict(self, block: Block) -> None:
        del self._lru[block]
        del self._by_key[block.key]
        if block.parent is not None:
            block.parent.children -= 1
        self._free_rows.append(block.row)
        self.evictions += 1


class BlockPool:
    """The KV of cached blocks: k and v of shape (n_layer, n_blocks, n_head, block_tokens,
    head_dim), the same dtype and device as the KV cache they are copied from and into
    (model.KVCache: k, v of shape (n_layer, n_slots, n_head, max_len, head_dim))."""

    def __init__(self, like, n_blocks: int, block_tokens: int):
        n_layer, _, n_head, _, head_dim = like.k.shape
        shape = (n_layer, n_blocks, n_head, block_tokens, head_dim)
        # empty, not zeros: on a CPU untouched pages cost no memory until a block is stored.
        self.k = torch.empty(shape, dtype=like.k.dtype, device=like.k.device)
        self.v = torch.empty(shape, dtype=like.v.dtype, device=like.v.device)
        self.block_tokens = block_tokens

    @staticmethod
    def bytes_per_block(like, block_tokens: int) -> int:
        n_layer, _, n_head, _, head_dim = like.k.shape
        return 2 * n_layer * n_head * block_tokens * head_dim * like.k.element_size()

    def save(self, cache, slot: int, first_block: int, rows: list[int]) -> None:
        """Copy the slot's blocks first_block, first_block+1, ... into pool rows `rows`."""
        start, n = first_block * self.block_tokens, len(rows)
        index = host_to_device(torch.tensor(rows, dtype=torch.long), self.k.device)
        for src, pool in ((cache.k, self.k), (cache.v, self.v)):
            span = src[:, slot, :, start : start + n * self.block_tokens]  # (L, H, n*bt, D)
            pool[:, index] = span.unflatten(2, (n, self.block_tokens)).transpose(1, 2)

    def load(self, cache, slot: int, first_block: int, rows: list[int]) -> None:
        """Copy pool rows `rows` into the slot as its blocks first_block, first_block+1, ..."""
        start, n = first_block * self.block_tokens, len(rows)
        index = host_to_device(torch.tensor(rows, dtype=torch.long), self.k.device)
        for pool, dst in ((self.k, cache.k), (self.v, cache.v)):
            blocks = pool.index_select(1, index)  # (L, n, H, bt, D)
            dst[:, slot, :, start : start + n * self.block_tokens] = blocks.transpose(1, 2).flatten(2, 3)


class PrefixCache:
    """What the engine calls: restore a prompt's cached beginning into a slot, store a slot's
    prefilled prompt blocks. Owned by the engine's loop thread; the counters may be read
    from any thread (metrics)."""

    def __init__(self, cache, block_tokens: int, n_blocks: int):
        self.block_tokens = block_tokens
        self.index = BlockIndex(n_blocks, block_tokens)
        self.pool = BlockPool(cache, n_blocks, block_tokens)
        self.bytes_per_block = BlockPool.bytes_per_block(cache, block_tokens)

    @classmethod
    def sized(cls, cache, block_tokens: int, max_mib: float, n_blocks: int = 0) -> "PrefixCache | None":
        """A cache of n_blocks blocks, or (n_blocks 0) as many as fit max_mib MiB;
        None when that is not even one block."""
        if n_blocks <= 0:
            n_blocks = int(max_mib * MIB) // BlockPool.bytes_per_block(cache, block_tokens)
        return cls(cache, block_tokens, n_blocks) if n_blocks >= 1 else None

    @property
    def blocks_used(self) -> int:
        return self.index.used

    @property
    def capacity_blocks(self) -> int:
        return self.index.capacity

    @property
    def bytes_used(self) -> int:
        return self.index.used * self.bytes_per_block

    @property
    def evictions(self) -> int:
        return self.index.evictions

    def restore(self, cache, slot: int, prompt: list[int], held: int = 0) -> int:
        """Copy the cached blocks that begin `prompt` into the slot, past the `held` tokens the
        slot already holds; returns how many prompt tokens the slot now holds (at most
        len(prompt) - 1: the last token is always fed, its logits give the first new token)."""
        chain = self.index.match(prompt)
        self.index.touch(chain)
        cached = len(chain) * self.block_tokens
        if cached > held:
            first = held // self.block_tokens  # blocks before it are in the slot already
            self.pool.load(cache, slot, first, [b.row for b in chain[first:]])
            held = cached
        return min(held, len(prompt) - 1)

    def store(self, cache, slot: int, tokens: list[int]) -> int:
        """Cache the full blocks of `tokens`, whose KV (computed by prefill) fills the slot's
        positions 0..len(tokens)-1; returns how many blocks were evicted for room."""
        evicted_before = self.index.evictions
        chain = self.index.match(tokens)
        new = self.index.extend(chain, tokens)
        if new:
            self.pool.save(cache, slot, len(chain), [b.row for b in new])
        self.index.touch(chain + new)
        return self.index.evictions - evicted_before
