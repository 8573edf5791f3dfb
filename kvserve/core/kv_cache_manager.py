"""Paged KV-cache bookkeeping: a pool of fixed-size blocks with prefix caching. Pure Python.

Invariants:
- A block is in exactly one of two states: referenced (ref_cnt > 0, owned by one or more
  requests' block tables) or free (ref_cnt == 0, in `free_queue`).
- A free block may still hold a cached prefix (its hash is in `cached`): it is reusable by a
  later request with the same prefix until it is evicted. Eviction happens only when a free
  block is handed out for new tokens, oldest-freed first (LRU); at that moment its hash entry
  is removed, so a hash can never point at a block that now holds other tokens.
- Only full blocks are cached. A block's key chains the parent block's hash with its own token
  ids; a hit is verified against the stored token ids and parent hash, not trusted.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from kvserve.core.request import Request


class KVBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "parent_hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None
        self.parent_hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent_hash, token_ids))


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1 (got {num_blocks})")
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # LRU order: the front is evicted first.
        self.free_queue: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[int, KVBlock] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def allocate(self, n: int) -> list[KVBlock]:
        if n > len(self.free_queue):
            raise RuntimeError(f"asked for {n} blocks with {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            _, blk = self.free_queue.popitem(last=False)
            if blk.block_hash is not None:  # evict its cached prefix
                if self.cached.get(blk.block_hash) is blk:
                    del self.cached[blk.block_hash]
                blk.block_hash = blk.parent_hash = blk.token_ids = None
            blk.ref_cnt = 1
            out.append(blk)
        return out

    def touch(self, blocks: Sequence[KVBlock]) -> None:
        """Take a reference on cache-hit blocks (reviving free ones)."""
        for blk in blocks:
            if blk.ref_cnt == 0:
                del self.free_queue[blk.block_id]
            blk.ref_cnt += 1

    def release(self, blocks: Sequence[KVBlock]) -> None:
        """Drop one reference on each block, in the given order (first = evicted first)."""
        for blk in blocks:
            blk.ref_cnt -= 1
            if blk.ref_cnt == 0:
                self.free_queue[blk.block_id] = blk
            elif blk.ref_cnt < 0:
                raise RuntimeError(f"block {blk.block_id} released more often than taken")

    def lookup(self, block_hash: int, parent_hash: int | None, token_ids: tuple[int, ...]) -> KVBlock | None:
        blk = self.cached.get(block_hash)
        if blk is None or blk.token_ids != token_ids or blk.parent_hash != parent_hash:
            return None
        return blk

    def cache(self, blk: KVBlock, block_hash: int, parent_hash: int | None, token_ids: tuple[int, ...]) -> None:
        if blk.block_hash is not None or block_hash in self.cached:
            return  # already cached, or another block holds the same prefix: keep that one
        blk.block_hash, blk.parent_hash, blk.token_ids = block_hash, parent_hash, token_ids
        self.cached[block_hash] = blk


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        # Per request: the KVBlock objects behind request.block_ids.
        self._blocks: dict[str, list[KVBlock]] = {}
        # Per request: how many of its leading blocks were already offered to the cache.
        self._num_cached: dict[str, int] = {}
        self.prefix_queries = 0  # tokens of admitted requests looked up in the prefix cache
        self.prefix_hits = 0  # of which were served from it

    # -- stats ------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def block_owners(self) -> dict[str, list[int]]:
        """Block ids held by each request that holds any (a block shared through the prefix
        cache is listed under every request holding it). A copy: safe to keep."""
        return {rid: [b.block_id for b in blocks] for rid, blocks in self._blocks.items() if blocks}

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -----------------------------------------------------------------------
    def _hashes(self, req: Request, num_tokens: int) -> list[int]:
        """Chained hashes of the request's full blocks within its first `num_tokens` tokens."""
        bs = self.block_size
        hashes = req.block_hashes
        for i in range(len(hashes), num_tokens // bs):
            parent = hashes[i - 1] if i else None
            hashes.append(hash_block(parent, tuple(req.all_token_ids[i * bs : (i + 1) * bs])))
        return hashes

    def get_computed_blocks(self, req: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of full blocks. At least one token is always left to compute
        (its logits are needed to sample), and requests wanting prompt logprobs skip the cache."""
        if not self.enable_prefix_caching or req.sampling_params.prompt_logprobs is not None:
            return [], 0
        bs = self.block_size
        max_blocks = (req.num_tokens - 1) // bs
        hashes = self._hashes(req, max_blocks * bs)
        hits: list[KVBlock] = []
        for i in range(max_blocks):
            parent = hashes[i - 1] if i else None
            blk = self.pool.lookup(hashes[i], parent, tuple(req.all_token_ids[i * bs : (i + 1) * bs]))
            if blk is None:
                break
            hits.append(blk)
        return hits, len(hits) * bs

    # -- allocation -------------------------------------------------------------------------
    def allocate_slots(
        self,
        req: Request,
        num_new_tokens: int,
        computed_blocks: Sequence[KVBlock] = (),
    ) -> list[int] | None:
        """Make room for `num_new_tokens` more tokens of `req` (after `computed_blocks`, the
        prefix-cache hits of a request being admitted). Returns the ids of the blocks added to
        its table, or None (and changes nothing) when the pool cannot supply them."""
        owned = self._blocks.setdefault(req.request_id, [])
        num_computed = req.num_computed_tokens + len(computed_blocks) * self.block_size
        need = self.blocks_needed(num_computed + num_new_tokens) - len(owned) - len(computed_blocks)
        revived = sum(1 for b in computed_blocks if b.ref_cnt == 0)  # leave the free queue
        if max(need, 0) + revived > self.pool.num_free:
            if not owned:
                del self._blocks[req.request_id]
            return None
        self.pool.touch(computed_blocks)
        new_blocks = self.pool.allocate(max(need, 0))
        added = list(computed_blocks) + new_blocks
        owned.extend(added)
        req.block_ids.extend(b.block_id for b in added)
        if self.enable_prefix_caching:
            # Cache every block these tokens fill. Safe before the forward pass runs: each
            # layer writes the whole batch's K/V before any attention reads, so a request
            # hitting these blocks in the same step reads them after they are written.
            # Speculative draft positions (past req.num_tokens) are never hashed: only
            # accepted tokens reach the cache (`trim` caches them after verification).
            self._cache_full_blocks(req, owned, min(num_computed + num_new_tokens, req.num_tokens))
        return [b.block_id for b in added]

    def trim(self, req: Request, num_tokens: int) -> int:
        """After a speculative verify step: keep only the blocks that `num_tokens` computed
        tokens need (the rejected drafts' wholly unused tail blocks go back to the pool; their
        slots in a kept block are overwritten later), and offer the full blocks of accepted
        tokens to the prefix cache. Returns how many blocks were released."""
        owned = self._blocks.get(req.request_id)
        if owned is None:
            return 0
        keep = self.blocks_needed(num_tokens)
        dropped = owned[keep:]
        if dropped:
            del owned[keep:]
            del req.block_ids[keep:]
            self.pool.release(list(reversed(dropped)))
        if self.enable_prefix_caching:
            self._cache_full_blocks(req, owned, min(num_tokens, req.num_tokens))
        return len(dropped)

    def _cache_full_blocks(self, req: Request, owned: list[KVBlock], num_tokens: int) -> None:
        hashes = self._hashes(req, num_tokens)
        bs = self.block_size
        start = self._num_cached.get(req.request_id, 0)
        for i in range(start, num_tokens // bs):
            blk = owned[i]
            if blk.block_hash is None:
                parent = hashes[i - 1] if i else None
                self.pool.cache(blk, hashes[i], parent, tuple(req.all_token_ids[i * bs : (i + 1) * bs]))
        self._num_cached[req.request_id] = max(start, num_tokens // bs)

    def free(self, req: Request) -> None:
        """Return all of the request's blocks; tail blocks go first in the eviction order, so
        the shared head of a prefix outlives its request-specific tail."""
        owned = self._blocks.pop(req.request_id, [])
        self._num_cached.pop(req.request_id, None)
        self.pool.release(list(reversed(owned)))
        req.block_ids.clear()

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (only when no block is in use)."""
        if self.pool.num_free != self.pool.num_blocks:
            return False
        for blk in self.pool.blocks:
            blk.block_hash = blk.parent_hash = blk.token_ids = None
        self.pool.cached.clear()
        return True
