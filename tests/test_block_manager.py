import random

import pytest
import torch

from internvl_engine.engine import block_manager as bm_mod
from internvl_engine.engine.block_manager import Allocation, BlockManager, MediaSpan, NoFreeBlocksError, media_key

BLOCK_SIZES = [16, 32]
IMG = 151667  # any placeholder id


def key(i: int) -> bytes:
    return media_key(torch.full((1, 3, 4, 4), float(i)), max_num_tiles=1)


def slot(bm, seq_id, position: int) -> int:
    """The KV slot of a position (the kernel contract: block * block_size + offset)."""
    return bm.block_table(seq_id)[position // bm.block_size] * bm.block_size + position % bm.block_size


def prompt(n: int, seed: int = 0) -> list[int]:
    r = random.Random(seed)
    return [r.randrange(1000) for _ in range(n)]


def computed(bm: BlockManager, seq_id, ids, media=(), reserve=0) -> Allocation:
    """allocate + (pretend) prefill + register, as the engine will do it."""
    a = bm.allocate(seq_id, ids, media, reserve)
    bm.register_computed(seq_id, ids)
    bm.check_invariants()
    return a


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_allocate_free_no_leak_and_slots(bs):
    bm = BlockManager(10, bs)
    a = bm.allocate("a", prompt(2 * bs + 3), reserve=bs)  # 3*bs + 3 tokens -> 4 blocks
    assert a.num_cached_tokens == 0 and len(a.block_table) == 4 and bm.num_free_blocks == 6
    t = bm.block_table("a")
    assert t == a.block_table
    for p in (0, bs - 1, bs, 3 * bs + 2):
        assert slot(bm, "a", p) == t[p // bs] * bs + p % bs
    assert len({slot(bm, "a", p) for p in range(4 * bs)}) == 4 * bs
    bm.check_invariants()
    bm.free("a")
    bm.check_invariants()
    assert bm.num_free_blocks == 10 and "a" not in bm


@pytest.mark.parametrize("bs", BLOCK_SIZES)
@pytest.mark.parametrize("extra, cached_blocks", [(5, 3), (0, 2), (1, 3)])
def test_identical_prompt_hits_full_blocks_capped_at_len_minus_one(bs, extra, cached_blocks):
    bm = BlockManager(32, bs)
    ids = prompt(3 * bs + extra)
    assert computed(bm, "a", ids).num_cached_tokens == 0
    b = computed(bm, "b", ids)
    # with exactly 3 full blocks the last one holds the last token, which must be computed for its logits
    assert b.num_cached_tokens == cached_blocks * bs
    assert b.block_table[:cached_blocks] == bm.block_table("a")[:cached_blocks]
    assert not set(b.block_table[cached_blocks:]) & set(bm.block_table("a"))
    assert bm.prefix_hit_tokens == cached_blocks * bs and bm.prefix_query_tokens == 2 * len(ids)


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_short_prompt_and_unregistered_prefix_never_hit(bs):
    bm = BlockManager(32, bs)
    short = prompt(bs)
    computed(bm, "s1", short)
    assert bm.allocate("s2", short).num_cached_tokens == 0
    ids = prompt(3 * bs, seed=1)
    bm.allocate("a", ids)  # prefill not finished: its KV is not valid yet
    assert bm.allocate("b", ids).num_cached_tokens == 0
    bm.register_computed("a", ids, num_computed=bs + 1)  # only the first block is written
    assert bm.allocate("c", ids).num_cached_tokens == bs
    bm.check_invariants()


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_same_tokens_different_image_no_hit(bs):
    bm = BlockManager(32, bs)
    ids = prompt(4 * bs + 1)
    span = (bs + 3, 2 * bs + 5)  # the image touches blocks 1 and 2
    ids[span[0]:span[1]] = [IMG] * (span[1] - span[0])
    img_a = [MediaSpan(*span, key(1))]
    img_b = [MediaSpan(*span, key(2))]  # same size, different pixels
    computed(bm, "a", ids, img_a)
    assert bm.allocate("b", ids, img_b).num_cached_tokens == bs  # block 0 precedes the image and is shared
    assert bm.allocate("c", ids, img_a).num_cached_tokens == 4 * bs
    assert bm.allocate("d", ids).num_cached_tokens == bs  # no media at all
    bm.check_invariants()


def test_media_span_and_allocation_validation():
    with pytest.raises(ValueError):
        MediaSpan(3, 3, b"x")
    with pytest.raises(TypeError):
        MediaSpan(0, 1, "x")
    bm = BlockManager(4, 16)
    with pytest.raises(ValueError):
        bm.allocate("a", [1, 2, 3], [MediaSpan(2, 5, b"x")])
    with pytest.raises(ValueError):
        bm.allocate("a", [])
    bm.allocate("a", [1])
    with pytest.raises(ValueError):
        bm.allocate("a", [1])
    with pytest.raises(KeyError):
        bm.free("nope")


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_partial_prefix_hit(bs):
    bm = BlockManager(32, bs)
    ids = prompt(5 * bs)
    other = ids[:2 * bs + 7] + prompt(3 * bs, seed=9)  # diverges inside block 2
    computed(bm, "a", ids)
    b = computed(bm, "b", other)
    assert b.num_cached_tokens == 2 * bs
    assert b.block_table[:2] == bm.block_table("a")[:2] and b.block_table[2] != bm.block_table("a")[2]


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_shared_block_refcount_and_not_reused_while_referenced(bs):
    bm = BlockManager(8, bs)
    ids = prompt(2 * bs + 1)
    computed(bm, "a", ids)  # 3 blocks
    b = computed(bm, "b", ids)  # shares 2, one fresh
    shared = set(b.block_table[:2])
    assert bm.num_free_blocks == 4
    bm.free("a")  # shared blocks still held by b; a's last block becomes free
    bm.check_invariants()
    assert bm.num_free_blocks == 5
    fresh = bm.allocate("c", prompt(5 * bs, seed=3)).block_table
    assert not shared & set(fresh) and bm.num_free_blocks == 0
    with pytest.raises(NoFreeBlocksError):
        bm.allocate("d", [1])
    bm.free("b")
    bm.free("c")
    bm.check_invariants()
    assert bm.num_free_blocks == 8


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_lru_eviction_under_pressure(bs):
    bm = BlockManager(6, bs)
    a_ids, b_ids = prompt(2 * bs + 1, seed=1), prompt(2 * bs + 1, seed=2)
    computed(bm, "a", a_ids)
    computed(bm, "b", b_ids)
    bm.free("a")
    bm.free("b")  # a's cached blocks are now the least recently released
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 4  # cached blocks count as free
    # 2 unhashed last blocks are free; one more fresh block evicts a's tail (block 1) and keeps its head
    computed(bm, "x", prompt(3 * bs, seed=3))
    assert bm.num_cached_tokens(a_ids) == bs and bm.num_cached_tokens(b_ids) == 2 * bs
    assert bm.allocate("b2", b_ids).num_cached_tokens == 2 * bs  # revives b's 2 blocks, evicts a's head
    assert bm.num_cached_tokens(a_ids) == 0 and bm.num_free_blocks == 0
    bm.check_invariants()
    for s in ("x", "b2"):
        bm.free(s)
    # a pool-wide request evicts everything; the old prefixes are gone afterwards
    computed(bm, "big", prompt(6 * bs, seed=4))
    assert bm.num_free_blocks == 0
    bm.free("big")
    assert bm.allocate("a3", a_ids).num_cached_tokens == 0
    bm.check_invariants()


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_hit_on_evictable_blocks_counts_against_free(bs):
    bm = BlockManager(4, bs)
    ids = prompt(3 * bs + 1)
    computed(bm, "a", ids)
    bm.free("a")
    assert bm.num_free_blocks == 4
    # reviving 3 cached blocks and one fresh block uses the whole pool; eviction must not take the revived ones
    a = bm.allocate("b", ids)
    assert a.num_cached_tokens == 3 * bs and bm.num_free_blocks == 0 and len(set(a.block_table)) == 4
    bm.free("b")
    with pytest.raises(NoFreeBlocksError) as e:
        bm.allocate("c", ids, reserve=bs)
    assert (e.value.needed, e.value.free) == (5, 4)
    bm.check_invariants()
    assert bm.num_free_blocks == 4 and bm.allocate("c", ids).num_cached_tokens == 3 * bs  # failure changed nothing


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_append_across_block_boundaries_and_decode_registration(bs):
    bm = BlockManager(4, bs)
    ids = prompt(bs - 1)
    bm.allocate("a", ids)
    bm.register_computed("a", ids)
    assert len(bm.block_table("a")) == 1
    assert bm.append_slot("a", bs) and len(bm.block_table("a")) == 1
    assert bm.append_slot("a", bs + 1) and len(bm.block_table("a")) == 2
    assert slot(bm, "a", bs) == bm.block_table("a")[1] * bs
    assert bm.append_slot("a", 4 * bs + 1) is False and len(bm.block_table("a")) == 2  # would need 5 of 4
    assert bm.append_slot("a", 4 * bs) and bm.num_free_blocks == 0
    assert bm.append_slot("a", 4 * bs + 1) is False and len(bm.block_table("a")) == 4
    bm.check_invariants()
    # decode filled blocks 0 and 1 (positions up to 2*bs), so a recomputed/continued prompt hits them
    tokens = ids + prompt(bs + 5, seed=7)
    bm.register_computed("a", tokens, num_computed=len(tokens) - 1)  # the last sampled token has no KV yet
    bm.free("a")
    assert bm.allocate("b", tokens).num_cached_tokens == 2 * bs
    bm.check_invariants()


def test_prefix_caching_disabled():
    bm = BlockManager(16, 16, enable_prefix_caching=False)
    ids = prompt(64)
    computed(bm, "a", ids)
    assert computed(bm, "b", ids).num_cached_tokens == 0 and bm.num_cached_blocks == 0
    bm.free("a")
    bm.free("b")
    assert bm.num_free_blocks == 16


def test_hash_collision_is_verified(monkeypatch):
    monkeypatch.setattr(bm_mod, "_block_hash", lambda content: b"same" * 8)
    bm = BlockManager(16, 16)
    computed(bm, "a", prompt(40, seed=1))
    assert bm.allocate("b", prompt(40, seed=2)).num_cached_tokens == 0
    assert bm.allocate("c", prompt(40, seed=1)).num_cached_tokens == 16  # true match; block 1 collides with 0's
    bm.check_invariants()


def test_duplicate_block_keeps_first_registration():
    bm = BlockManager(16, 16)
    ids = prompt(48)
    bm.allocate("a", ids)
    bm.allocate("b", ids)  # both computed concurrently, neither hits
    bm.register_computed("a", ids)
    bm.register_computed("b", ids)
    assert bm.num_cached_blocks == 3
    bm.free("a")
    bm.free("b")
    bm.check_invariants()
    assert bm.num_free_blocks == 16 and bm.allocate("c", ids).num_cached_tokens == 32


@pytest.mark.parametrize("bs,seed", [(16, 0), (32, 1), (16, 2)])
def test_random_stress_invariants_and_kv_contents(bs, seed):
    """Thousands of random allocate / prefill / decode / free / preempt steps over a small vocabulary and a few
    images, so prefixes collide often. A fake KV pool records, per slot, a digest of the prefix ending there; every
    cached hit must point at exactly the KV its own prefix would have produced, and a sequence only ever writes
    into blocks it holds alone."""
    r = random.Random(seed)
    num_blocks = 24
    bm = BlockManager(num_blocks, bs)
    kv = {}  # slot -> digest of (tokens, media keys) up to and including that position
    seqs = {}  # id -> (tokens, media)
    bases = [[r.randrange(4) for _ in range(3 * bs)] for _ in range(3)]
    keys = [key(i) for i in range(3)]

    def digests(tokens, media):
        out, d = [], 0
        for p, t in enumerate(tokens):
            d = hash((d, t, tuple(s.key for s in media if s.start <= p < s.end)))
            out.append(d)
        return out

    def write(sid, start, end):
        tokens, media = seqs[sid]
        dg = digests(tokens, media)
        for p in range(start, end):
            b = bm.block_table(sid)[p // bs]
            assert bm._ref[b] == 1, "write into a shared block"
            kv[slot(bm, sid, p)] = dg[p]

    def check(sid, upto):
        tokens, media = seqs[sid]
        dg = digests(tokens, media)
        assert [kv.get(slot(bm, sid, p)) for p in range(upto)] == dg[:upto]

    n_ops = 0
    for step in range(2500):
        live = list(seqs)
        op = r.random()
        if op < 0.4 or not live:
            base = r.choice(bases)
            n = r.randrange(1, 3 * bs + 1)
            tokens = base[:n] if r.random() < 0.7 else [r.randrange(4) for _ in range(n)]
            media = ()
            if n > 4 and r.random() < 0.5:
                s = r.randrange(n - 3)
                e = r.randrange(s + 1, n)
                tokens[s:e] = [IMG] * (e - s)
                media = (MediaSpan(s, e, r.choice(keys)),)
            sid = f"s{step}"
            before = {k: bm.block_table(k) for k in seqs}
            try:
                a = bm.allocate(sid, tokens, media, reserve=r.randrange(2))
            except NoFreeBlocksError as e:
                assert e.needed > bm.num_free_blocks
                continue
            assert a.num_cached_tokens % bs == 0 and a.num_cached_tokens <= len(tokens) - 1
            assert {k: bm.block_table(k) for k in before} == before  # eviction never touched a held block
            seqs[sid] = (tokens, media)
            check(sid, a.num_cached_tokens)
            write(sid, a.num_cached_tokens, len(tokens))
            bm.register_computed(sid, tokens)
        elif op < 0.75:  # one decode step: the last token's KV gets written, a new token is sampled
            sid = r.choice(live)
            tokens, media = seqs[sid]
            if not bm.append_slot(sid, len(tokens) + 1):
                assert bm.num_free_blocks == 0 and len(tokens) % bs == 0
                bm.free(sid)  # preempt
                del seqs[sid]
            else:
                tokens.append(r.randrange(4))
                write(sid, len(tokens) - 1, len(tokens))
                bm.register_computed(sid, tokens)
        else:
            sid = r.choice(live)
            check(sid, len(seqs[sid][0]))
            bm.free(sid)
            del seqs[sid]
        bm.check_invariants()
        n_ops += 1
    assert n_ops > 2000 and bm.prefix_hit_tokens > 0
    for sid in list(seqs):
        bm.free(sid)
    bm.check_invariants()
    assert bm.num_free_blocks == num_blocks
