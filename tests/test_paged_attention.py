"""paged_attention (decode over block tables) on every backend against ops.paged_attention_ref on fp64 copies, with
the flash-attention tolerance rule (kernel_cases.attention_refs): GQA ratios 1, 6 and 7, block sizes 16 and 32,
shuffled block tables with unused (garbage) entries, lengths that are not multiples of the block size, and NaN
planted in every cache slot no sequence owns."""
import pytest
import torch

from internvl_engine import ops
from kernel_cases import BACKENDS, DTYPES, assert_attention_close, attention_refs, backend, packed_qkv


def _cache(lens, block_size, kv_heads, head_dim, dtype, device, seed):
    """Caches with each sequence's tokens in shuffled blocks, NaN everywhere else, and tables padded with ids of
    NaN blocks past each sequence's end."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lens]
    width = max(need) + 1
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    owned, spare = perm[:sum(need)], perm[sum(need):]
    tables, i = [], 0
    k = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"))
    v = k.clone()
    for n, m in zip(lens, need):
        blocks = owned[i:i + m]
        i += m
        for t in range(n):
            k[blocks[t // block_size], t % block_size] = torch.randn(kv_heads, head_dim, generator=g)
            v[blocks[t // block_size], t % block_size] = torch.randn(kv_heads, head_dim, generator=g)
        tables.append(blocks + [spare[j % len(spare)] for j in range(width - m)])
    return (k.to(dtype).to(device), v.to(dtype).to(device), torch.tensor(tables, dtype=torch.int32, device=device),
            torch.tensor(lens, dtype=torch.int32, device=device))


@pytest.mark.parametrize("backend_name,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 64), (6, 1, 64), (7, 1, 128), (14, 2, 64), (4, 2, 16)])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("lens", [[1], [37, 1, 64, 300], [1025]])
def test_paged_attention(backend_name, device, dtype, heads, kv_heads, head_dim, block_size, lens):
    _run(backend_name, device, dtype, heads, kv_heads, head_dim, block_size, lens)


@pytest.mark.parametrize("backend_name,device", BACKENDS)
def test_paged_attention_honours_scale(backend_name, device):
    """The other cases pass head_dim ** -0.5, which is also SDPA's default: a backend that dropped its scale would
    pass them all."""
    _run(backend_name, device, torch.float32, 6, 2, 32, 16, [37, 1, 64], scale=0.3)


def _run(backend_name, device, dtype, heads, kv_heads, head_dim, block_size, lens, scale=None):
    k_cache, v_cache, tables, seq_lens = _cache(lens, block_size, kv_heads, head_dim, dtype, device, seed=len(lens))
    q, _, _ = packed_qkv(len(lens), heads, kv_heads, head_dim, dtype, device, seed=5)
    scale = head_dim ** -0.5 if scale is None else scale
    ref, lowp = attention_refs(ops.paged_attention_ref, q, k_cache, v_cache, tables, seq_lens, scale)
    with backend(backend_name, device):
        out = ops.paged_attention(q, k_cache, v_cache, tables, seq_lens, scale)
    assert out.shape == q.shape
    assert_attention_close(out, ref, lowp, dtype)


KERNEL_BACKENDS = [p for p in BACKENDS if p.values[0] != "torch"]


@pytest.mark.parametrize("backend_name,device", KERNEL_BACKENDS)
def test_paged_attention_is_batch_invariant(backend_name, device):
    """A sequence's output is bit-identical alone, in a batch, and with a wider block table (split-KV partitions
    are fixed 256-token ranges, never chosen from the batch): what lets decode pad batches for CUDA graphs and
    still give each request the tokens it gets alone."""
    lens, bs = [1024, 37, 300], 16
    k_cache, v_cache, tables, seq_lens = _cache(lens, bs, 2, 64, torch.bfloat16, device, seed=3)
    q, _, _ = packed_qkv(len(lens), 8, 2, 64, torch.bfloat16, device, seed=4)
    q = q.contiguous()
    with backend(backend_name, device):
        batch = ops.paged_attention(q, k_cache, v_cache, tables, seq_lens, 0.125)
        wide = torch.cat([tables, tables[:, :1].expand(-1, 40)], 1).contiguous()  # capacity 65 -> 105 blocks
        for i, n in enumerate(lens):
            narrow = tables[i:i + 1, :-(-n // bs)].contiguous()
            for t in (narrow, wide[i:i + 1]):
                alone = ops.paged_attention(q[i:i + 1], k_cache, v_cache, t, seq_lens[i:i + 1], 0.125)
                assert torch.equal(alone[0], batch[i]), (i, t.shape)
