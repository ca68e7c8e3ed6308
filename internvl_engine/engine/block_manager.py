"""Paged KV block manager with prefix caching.

Hands out block ids of the preallocated KV pool (the tensors stay in runner.KVCache, shaped
[num_blocks, block_size, Hk, D] per layer); slot = block * block_size + offset, as in the kernel contract.

Prefix caching: every FULL block whose KV has been written is hashed as
    h_i = blake2b(h_{i-1}, the block's token ids, the media spans that overlap the block)
and registered, so a later prompt with the same leading blocks (same tokens AND same images) reuses their KV. A
released cached block keeps its hash and stays matchable until a fresh block is needed, the least recently released
first (an LRU of evictable blocks). Free = never-hashed free list + evictable cached blocks.

Lifecycle of a sequence: allocate() -> prefill writes the uncached positions -> register_computed() ->
decode: append_slot() before each step (+ register_computed() as blocks fill, optional) -> free().

Invariants (check_invariants() asserts them): every block is in exactly one of {free list, evictable LRU,
referenced}; a block's refcount equals the number of live block tables that hold it; only refcount-0 hashed blocks
are evictable; a block whose hash is registered is never written again, because only full blocks are hashed and a
sequence only writes at positions >= its cached prefix, which ends on a block boundary.

Not thread-safe: the engine loop owns it and is its only caller.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np
import torch

_DIGEST = 32  # bytes; blake2b-256 makes an accidental collision practically impossible, and hits are verified anyway


@dataclass(frozen=True)
class MediaSpan:
    """One image (or video frame) in a prompt: its placeholder tokens are token_ids[start:end]; key = media_key()."""
    start: int
    end: int
    key: bytes

    def __post_init__(self):
        if not (0 <= self.start < self.end):
            raise ValueError(f"MediaSpan needs 0 <= start < end, got [{self.start}, {self.end})")
        if not isinstance(self.key, bytes):
            raise TypeError(f"MediaSpan.key must be bytes, got {type(self.key).__name__}")


def media_key(content: torch.Tensor | bytes, **tiling) -> bytes:
    """Content key of one preprocessed image: its pixel tensor (dtype, shape, raw bytes) or the processor's digest
    of the uint8 pixels behind it (processor.images.content_digest), plus the tiling parameters that produced it
    (e.g. max_num_tiles=12, image_size=448, num_patches=7). Tiling values must have a stable repr (ints, floats,
    strings, tuples of those). The same key means the same projector output, so it keys both the prefix hashes and
    the VisionCache."""
    h = hashlib.blake2b(digest_size=_DIGEST)
    if isinstance(content, bytes):
        h.update(repr(("digest", sorted(tiling.items()))).encode())
        h.update(content)
        return h.digest()
    t = content.detach().reshape(-1).contiguous().cpu()
    h.update(repr((str(t.dtype), tuple(content.shape), sorted(tiling.items()))).encode())
    if t.numel():
        h.update(memoryview(t.view(torch.uint8).numpy()))  # no copy of the pixels
    return h.digest()


class NoFreeBlocksError(RuntimeError):
    """allocate() found too few free blocks. Nothing was changed; the scheduler preempts a sequence or waits."""

    def __init__(self, needed: int, free: int):
        super().__init__(f"KV pool exhausted: need {needed} blocks, {free} free")
        self.needed, self.free = needed, free


@dataclass(frozen=True)
class Allocation:
    block_table: list[int]  # a copy; covers len(token_ids) + reserve tokens
    num_cached_tokens: int  # positions [0, num_cached_tokens) already hold valid KV; compute from there


@dataclass
class _Seq:
    table: list[int]
    media: tuple[MediaSpan, ...]
    hashes: list[bytes]  # hashes of the leading full blocks known to hold valid KV (hit or registered)
    mirror: np.ndarray | None = None  # `table` as int32, rebuilt when the table grows (once a block of decode)

    def array(self) -> np.ndarray:
        if self.mirror is None or len(self.mirror) != len(self.table):
            self.mirror = np.array(self.table, dtype=np.int32)
        return self.mirror


def _block_content(parent: bytes, tokens: Sequence[int], media: Sequence[MediaSpan], start: int):
    """Canonical content of the block at token offset start: spans are stored relative to the block so identical
    blocks at the same depth of identical prefixes compare equal."""
    end = start + len(tokens)
    spans = tuple((s.start - start, s.end - start, s.key) for s in media if s.start < end and s.end > start)
    return parent, tuple(tokens), spans


def _block_hash(content) -> bytes:
    parent, tokens, spans = content
    h = hashlib.blake2b(parent, digest_size=_DIGEST)
    h.update(struct.pack(f"<q{len(tokens)}q", len(tokens), *tokens))
    h.update(struct.pack("<q", len(spans)))
    for s, e, key in spans:
        h.update(struct.pack("<qqq", s, e, len(key)))
        h.update(key)
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size, self.enable_prefix_caching = num_blocks, block_size, enable_prefix_caching
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._content: list[tuple | None] = [None] * num_blocks  # what the hash was computed from, to verify hits
        self._free: deque[int] = deque(range(num_blocks))  # refcount 0, no hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # refcount 0, hashed; first = least recently freed
        self._by_hash: dict[bytes, int] = {}
        self._seqs: dict[Hashable, _Seq] = {}
        self.prefix_query_tokens = 0  # prompt tokens looked up / found cached, for hit-rate metrics
        self.prefix_hit_tokens = 0

    # ---------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._by_hash)

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._seqs

    def block_table(self, seq_id) -> list[int]:
        return list(self._seqs[seq_id].table)

    def block_table_array(self, seq_id) -> np.ndarray:
        """seq_id's block table as int32, shared and read-only: decode copies rows of it every step, and converting
        a multi-tile prompt's 200+ entries from a list for each sequence on each step was most of a step's host
        time at batch 64."""
        return self._seqs[seq_id].array()

    def _cdiv(self, n: int) -> int:
        return -(-n // self.block_size)

    def _match(self, token_ids: Sequence[int], media: tuple[MediaSpan, ...]) -> list[tuple[bytes, int]]:
        """(hash, block) of the leading cached blocks. At most (len - 1) // block_size of them, so the last prompt
        token is always computed (its logits start the generation)."""
        if not self.enable_prefix_caching:
            return []
        bs, parent, hits = self.block_size, b"", []
        for i in range((len(token_ids) - 1) // bs):
            content = _block_content(parent, token_ids[i * bs:(i + 1) * bs], media, i * bs)
            h = _block_hash(content)
            b = self._by_hash.get(h)
            if b is None or self._content[b] != content:
                break
            hits.append((h, b))
            parent = h
        return hits

    def _blocks_needed(self, hits, num_tokens: int) -> int:
        # a hit on an evictable block takes it out of the free count just like a fresh block does
        return self._cdiv(num_tokens) - len(hits) + sum(self._ref[b] == 0 for _, b in hits)

    def num_cached_tokens(self, token_ids: Sequence[int], media: Sequence[MediaSpan] = ()) -> int:
        """How many leading tokens allocate() would find cached now (no side effects; the scheduler can size the
        prefill work with it)."""
        return len(self._match(token_ids, tuple(sorted(media, key=lambda s: s.start)))) * self.block_size

    # ---------------------------------------------------------------- mutations
    def _take_fresh(self) -> int:
        # prefer never-hashed blocks so cached prefixes survive as long as possible
        if self._free:
            b = self._free.popleft()
        else:
            b, _ = self._evictable.popitem(last=False)
            del self._by_hash[self._hash[b]]
            self._hash[b] = self._content[b] = None
        self._ref[b] = 1
        return b

    def allocate(self, seq_id, token_ids: Sequence[int], media: Sequence[MediaSpan] = (),
                 reserve: int = 0, use_cache: bool = True) -> Allocation:
        """Give seq_id a block table for its prompt plus `reserve` more tokens, reusing the longest cached run of
        leading full blocks (none with use_cache=False: a prompt whose every position must be computed). Raises
        NoFreeBlocksError (state unchanged) when the pool cannot supply the rest."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already has blocks")
        if not token_ids:
            raise ValueError("cannot allocate an empty prompt")
        media = tuple(sorted(media, key=lambda s: s.start))
        if media and media[-1].end > len(token_ids):
            raise ValueError(f"media span {media[-1]} runs past the prompt ({len(token_ids)} tokens)")
        hits = self._match(token_ids, media) if use_cache else []
        needed = self._blocks_needed(hits, len(token_ids) + reserve)
        if needed > self.num_free_blocks:
            raise NoFreeBlocksError(needed, self.num_free_blocks)
        for _, b in hits:  # revive before taking fresh blocks, so eviction cannot pick a block we are reusing
            if self._ref[b] == 0:
                del self._evictable[b]
            self._ref[b] += 1
        table = [b for _, b in hits]
        table += [self._take_fresh() for _ in range(self._cdiv(len(token_ids) + reserve) - len(hits))]
        self._seqs[seq_id] = _Seq(table, media, [h for h, _ in hits])
        cached = len(hits) * self.block_size
        self.prefix_query_tokens += len(token_ids)
        self.prefix_hit_tokens += cached
        return Allocation(list(table), cached)

    def append_slot(self, seq_id, num_tokens: int) -> bool:
        """Grow seq_id's table to hold num_tokens tokens in total (normally one new block when decode crosses a
        block boundary). Returns False, changing nothing, when the pool is exhausted."""
        seq = self._seqs[seq_id]
        missing = self._cdiv(num_tokens) - len(seq.table)
        if missing <= 0:
            return True
        if missing > self.num_free_blocks:
            return False
        seq.table += [self._take_fresh() for _ in range(missing)]
        return True

    def register_computed(self, seq_id, token_ids: Sequence[int], num_computed: int | None = None) -> None:
        """Make seq_id's full blocks within the first num_computed tokens (default len(token_ids)) matchable. Call
        only once the KV of those positions has been written (after the prefill step, or after decode steps).
        token_ids is the sequence's whole token list (prompt + output so far); media spans come from allocate()."""
        if not self.enable_prefix_caching:
            return
        seq, bs = self._seqs[seq_id], self.block_size
        n = len(token_ids) if num_computed is None else min(num_computed, len(token_ids))
        for i in range(len(seq.hashes), n // bs):
            content = _block_content(seq.hashes[-1] if seq.hashes else b"", token_ids[i * bs:(i + 1) * bs],
                                     seq.media, i * bs)
            h = _block_hash(content)
            seq.hashes.append(h)
            b = seq.table[i]
            # an identical block computed by another sequence first keeps the entry; ours stays unhashed and goes
            # back to the plain free list when released
            if h not in self._by_hash and self._hash[b] is None:
                self._by_hash[h], self._hash[b], self._content[b] = b, h, content

    def free(self, seq_id) -> None:
        """Release seq_id's blocks. Hashed blocks that nobody holds stay matchable until evicted; they are released
        tail first, so under pressure a chain is evicted from its end and its shared head survives longest."""
        for b in reversed(self._seqs.pop(seq_id).table):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if self._hash[b] is None:
                    self._free.append(b)
                else:
                    self._evictable[b] = None

    # ---------------------------------------------------------------- debugging
    def check_invariants(self) -> None:
        held = [0] * self.num_blocks
        for seq in self._seqs.values():
            for b in seq.table:
                held[b] += 1
        assert held == self._ref, "refcounts differ from the live block tables"
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free) and not free & evictable, "a block is free twice"
        for b in range(self.num_blocks):
            assert (self._ref[b] == 0) == (b in free or b in evictable), f"block {b} is neither held nor free"
            assert (b in evictable) <= (self._hash[b] is not None), f"evictable block {b} has no hash"
            assert (b in free) <= (self._hash[b] is None), f"free-list block {b} still has a hash"
        assert {h: b for b, h in enumerate(self._hash) if h is not None} == self._by_hash, "hash index out of sync"
