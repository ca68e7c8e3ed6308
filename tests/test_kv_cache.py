"""write_kv_cache on every backend against ops.write_kv_cache_ref: block sizes 16 and 32, skipped tokens (slot < 0),
strided k/v views, and untouched slots keeping their (NaN) contents."""
import pytest
import torch

from internvl_engine import ops
from kernel_cases import BACKENDS, DTYPES, backend, packed_qkv


@pytest.mark.parametrize("backend_name,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,kv_heads,head_dim,block_size", [(7, 1, 64, 16), (1025, 2, 128, 32),
                                                                 (33, 7, 64, 16), (3, 2, 16, 32)])
def test_write_kv_cache(backend_name, device, dtype, tokens, kv_heads, head_dim, block_size):
    g = torch.Generator().manual_seed(tokens)
    _, k, v = packed_qkv(tokens, 2, kv_heads, head_dim, dtype, device)
    num_blocks = -(-tokens // block_size) * 2
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[torch.rand(tokens, generator=g) < 0.3] = -1
    slots = slots.to(device)
    caches = [torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
              for _ in range(4)]
    with backend(backend_name, device):
        ops.write_kv_cache(k, v, caches[0], caches[1], slots)
    ops.write_kv_cache_ref(k, v, caches[2], caches[3], slots)
    for out, ref in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(out.isnan(), ref.isnan())
        assert torch.equal(out.nan_to_num(), ref.nan_to_num())


@pytest.mark.parametrize("backend_name,device", BACKENDS)
def test_write_kv_cache_all_skipped(backend_name, device):
    k = torch.randn(3, 2, 16, device=device)
    caches = [torch.zeros(2, 16, 2, 16, device=device) for _ in range(2)]
    with backend(backend_name, device):
        ops.write_kv_cache(k, k, caches[0], caches[1], torch.full((3,), -1, device=device))
    assert not caches[0].any() and not caches[1].any()
