"""flash_attention (varlen, causal GQA for the language model, bidirectional for the vision tower) on every backend,
against ops.flash_attention_ref on fp64 copies, with the flash-attention tolerance rule (kernel_cases.attention_refs:
the yardstick comes from the oracle, so the torch backend is tested like the others)."""
import pytest
import torch

from internvl_engine import ops
from kernel_cases import BACKENDS, DTYPES, assert_attention_close, attention_refs, backend, packed_qkv

# (query lengths, key lengths): one short sequence, one long, a varlen batch, and chunks appended to a cached
# prefix (Lq < Lk, causal mask aligned bottom-right)
SEQS = {"7": ([7], [7]), "1025": ([1025], [1025]), "varlen": ([7, 300, 1, 64], [7, 300, 1, 64]),
        "prefix": ([3, 17, 1], [40, 17, 33])}
HEADS = [(4, 4, 64), (6, 1, 64), (7, 1, 128), (14, 2, 128), (6, 2, 32), (4, 2, 16)]  # GQA ratios 1, 6, 7


def _run(backend_name, device, dtype, seqs, heads, kv_heads, head_dim, causal, scale=None):
    lq, lk = SEQS[seqs]
    q, _, _ = packed_qkv(sum(lq), heads, kv_heads, head_dim, dtype, device, seed=1)
    _, k, v = packed_qkv(sum(lk), heads, kv_heads, head_dim, dtype, device, seed=2)
    cu_q = torch.tensor([0] + lq, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    cu_k = torch.tensor([0] + lk, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    args = (cu_q, cu_k, max(lq), max(lk), causal, head_dim ** -0.5 if scale is None else scale)
    ref, lowp = attention_refs(ops.flash_attention_ref, q, k, v, *args)
    with backend(backend_name, device):
        out = ops.flash_attention(q, k, v, *args)
    assert out.shape == q.shape and out.is_contiguous()
    assert_attention_close(out, ref, lowp, dtype)


@pytest.mark.parametrize("backend_name,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", HEADS)
@pytest.mark.parametrize("seqs,causal", [("7", True), ("7", False), ("varlen", True), ("varlen", False),
                                         ("prefix", True)])  # a chunk appended to a cached prefix is causal
def test_flash_attention(backend_name, device, dtype, heads, kv_heads, head_dim, seqs, causal):
    _run(backend_name, device, dtype, seqs, heads, kv_heads, head_dim, causal)


@pytest.mark.parametrize("backend_name,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,causal", [(7, 1, 128, True), (4, 4, 64, False)])
def test_flash_attention_1025_tokens(backend_name, device, dtype, heads, kv_heads, head_dim, causal):
    _run(backend_name, device, dtype, "1025", heads, kv_heads, head_dim, causal)


@pytest.mark.parametrize("backend_name,device", BACKENDS)
def test_flash_attention_honours_scale(backend_name, device):
    """The other cases pass head_dim ** -0.5, which is also SDPA's default: a backend that dropped its scale would
    pass them all."""
    _run(backend_name, device, torch.float32, "prefix", 6, 2, 32, True, scale=0.3)


def test_torch_backend_output_is_dense_whatever_sdpa_returns(monkeypatch):
    """CUDA's fp32 SDPA returns its output as the transpose of a [B, H, L, D] tensor, which the CPU kernel does not:
    the torch backend must still hand back a contiguous [T, H, D] (a GPU-run failure, reproduced here)."""
    import torch.nn.functional as F
    from internvl_engine.ops import torch_ops
    real = F.scaled_dot_product_attention

    def cuda_like(q, k, v, **kw):  # q [B, H, L, D] -> out laid out [B, H, L, D] in memory
        return real(q, k, v, **kw).contiguous()

    monkeypatch.setattr(torch_ops.F, "scaled_dot_product_attention", cuda_like)
    _run("torch", "cpu", torch.float32, "7", 4, 2, 16, True)
