import pytest
import torch

from internvl_engine.engine.block_manager import media_key
from internvl_engine.engine.vision_cache import VisionCache


def feats(rows: int, value: float = 0.0) -> torch.Tensor:
    return torch.full((rows, 4), value)  # fp32: 16 bytes a row


def test_get_put_hits_misses_len_nbytes():
    c = VisionCache(1024)
    assert c.get(b"a") is None and (c.hits, c.misses) == (0, 1)
    c.put(b"a", feats(2, 1.0))
    assert len(c) == 1 and c.nbytes == 32 and b"a" in c
    assert torch.equal(c.get(b"a"), feats(2, 1.0)) and (c.hits, c.misses) == (1, 1)
    c.put(b"a", feats(3, 2.0))  # replaces
    assert len(c) == 1 and c.nbytes == 48 and c.get(b"a")[0, 0] == 2.0


def test_lru_order_and_byte_limit():
    c = VisionCache(64)  # four rows
    c.put(b"a", feats(1))
    c.put(b"b", feats(1))
    c.put(b"c", feats(2))
    c.get(b"a")  # a is now the most recently used; b the least
    c.put(b"d", feats(1))
    assert b"b" not in c and all(k in c for k in (b"a", b"c", b"d")) and c.nbytes == 64
    c.put(b"e", feats(3))  # evicts c, then a (LRU order), keeps d
    assert [k in c for k in (b"a", b"c", b"d", b"e")] == [False, False, True, True] and c.nbytes == 64


def test_oversize_not_cached_and_evicts_nothing():
    c = VisionCache(64)
    c.put(b"a", feats(2))
    c.put(b"big", feats(5))
    assert b"big" not in c and b"a" in c and c.nbytes == 32
    z = VisionCache(0)
    z.put(b"a", feats(1))
    assert len(z) == 0


def test_stores_detached_compact_tensor():
    c = VisionCache(1 << 20)
    w = torch.ones(2, 4, requires_grad=True)
    c.put(b"g", w * 2)
    assert not c.get(b"g").requires_grad
    batch = feats(100)
    c.put(b"v", batch[10:12])  # a view of a batched output: stored as its own 32 bytes
    stored = c.get(b"v")
    assert c.nbytes == 32 + 32 and stored.untyped_storage().nbytes() == 32


def test_media_key_tiling_and_content():
    px = torch.rand(3, 3, 8, 8)
    k = media_key(px, max_num_tiles=12, image_size=448, num_patches=3)
    assert isinstance(k, bytes) and len(k) == 32
    assert k == media_key(px.clone(), num_patches=3, image_size=448, max_num_tiles=12)  # kwarg order irrelevant
    assert k != media_key(px, max_num_tiles=6, image_size=448, num_patches=3)
    assert k != media_key(px, max_num_tiles=12, image_size=224, num_patches=3)
    assert k != media_key(px)
    other = px.clone()
    other[0, 0, 0, 0] += 1
    assert k != media_key(other, max_num_tiles=12, image_size=448, num_patches=3)
    assert media_key(px) != media_key(px.reshape(9, 1, 8, 8))  # same bytes, other shape
    assert media_key(px) != media_key(px.to(torch.bfloat16))
    assert media_key(px.transpose(2, 3)) == media_key(px.transpose(2, 3).contiguous())


@pytest.mark.parametrize("max_bytes", [-1])
def test_bad_limit(max_bytes):
    with pytest.raises(ValueError):
        VisionCache(max_bytes)
