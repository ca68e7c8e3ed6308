"""The torch backend of the kernel contract against the plain-torch references (the kernel-library issue adds
cpp / triton / cuda backends to these same checks)."""
import pytest
import torch

from internvl_engine import ops
from internvl_engine.ops import torch_ops as T

DTYPES = [torch.float32, torch.bfloat16]


def _close(a, b, dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(7, 769), (1025, 64)])
def test_norms(dtype, tokens, hidden):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    r = torch.randn(tokens, hidden, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    b = (0.1 * torch.randn(hidden, generator=g)).to(dtype)
    _close(T.rms_norm(x, w, 1e-6), ops.rms_norm_ref(x, w, 1e-6), dtype)
    y, res = T.rms_norm(x, w, 1e-6, r)
    y_ref, res_ref = ops.rms_norm_ref(x, w, 1e-6, r)
    _close(y, y_ref, dtype)
    _close(res, res_ref, dtype)
    _close(T.layer_norm(x, w, b, 1e-6), ops.layer_norm_ref(x, w, b, 1e-6), dtype)


def test_pixel_shuffle_closed_form():
    f = torch.randn(2, 32 * 32, 5)
    out = ops.pixel_shuffle_ref(f, 0.5)
    grid = f.view(2, 32, 32, 5)
    i, j = 3, 11
    expected = torch.cat([grid[:, 2 * i, 2 * j], grid[:, 2 * i, 2 * j + 1], grid[:, 2 * i + 1, 2 * j],
                          grid[:, 2 * i + 1, 2 * j + 1]], dim=-1)
    assert out.shape == (2, 256, 20)
    assert torch.equal(out[:, i * 16 + j], expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotary(dtype, head_dim):
    from internvl_engine.layers.rotary import RotaryEmbedding
    table = RotaryEmbedding(head_dim, 1e6, 4096).table("cpu")
    q = torch.randn(13, 6, head_dim).to(dtype)
    k = torch.randn(13, 2, head_dim).to(dtype)
    pos = torch.randint(0, 4096, (13,))
    q1, k1, q2, k2 = q.clone(), k.clone(), q.clone(), k.clone()
    T.rotary(q1, k1, pos, table)
    ops.rotary_ref(q2, k2, pos, table)
    _close(q1, q2, dtype)
    _close(k1, k2, dtype)


@pytest.mark.parametrize("slots", [[5, -1, 7, 3, -1], [-1, -1], [0, -1, 31], [-1, 0, 1]])
def test_write_kv_cache_skips_negative_slots(slots):
    sm = torch.tensor(slots)
    k, v = torch.randn(len(slots), 2, 64), torch.randn(len(slots), 2, 64)
    kc, vc = torch.randn(2, 16, 2, 64), torch.randn(2, 16, 2, 64)
    kr, vr = kc.clone(), vc.clone()
    T.write_kv_cache(k, v, kc, vc, sm)
    ops.write_kv_cache_ref(k, v, kr, vr, sm)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal,heads,kv_heads,head_dim", [(True, 6, 1, 64), (True, 7, 7, 128),
                                                            (False, 4, 4, 64), (True, 12, 2, 128)])
def test_flash_attention_varlen(dtype, causal, heads, kv_heads, head_dim):
    lens = [7, 33, 1]
    t = sum(lens)
    cu = torch.tensor([0, 7, 40, 41], dtype=torch.int32)
    q = torch.randn(t, heads, head_dim).to(dtype)
    k = torch.randn(t, kv_heads, head_dim).to(dtype)
    v = torch.randn(t, kv_heads, head_dim).to(dtype)
    scale = head_dim ** -0.5
    out = T.flash_attention(q, k, v, cu, cu, 33, 33, causal, scale)
    ref = ops.flash_attention_ref(q, k, v, cu, cu, 33, 33, causal, scale)
    _close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,heads,kv_heads", [(16, 14, 2), (32, 7, 1), (16, 6, 6)])
def test_paged_attention(dtype, block_size, heads, kv_heads):
    g = torch.Generator().manual_seed(1)
    kc = torch.randn(12, block_size, kv_heads, 64, generator=g).to(dtype)
    vc = torch.randn(12, block_size, kv_heads, 64, generator=g).to(dtype)
    kc[11] = float("nan")  # a block no table references beyond its length must not leak into the result
    vc[11] = float("nan")
    q = torch.randn(3, heads, 64, generator=g).to(dtype)
    tables = torch.tensor([[3, 7, 1, 11], [0, 11, 11, 11], [5, 2, 9, 4]], dtype=torch.int32)
    lens = torch.tensor([2 * block_size + 5, 1, 4 * block_size - 3], dtype=torch.int32)
    out = T.paged_attention(q, kc, vc, tables, lens, 0.125)
    ref = ops.paged_attention_ref(q, kc, vc, tables, lens, 0.125)
    _close(out, ref, dtype)


def test_use_backend_rejects_unknown():
    from internvl_engine.errors import BackendError
    with pytest.raises(BackendError, match="cuda"):
        with ops.use_backend("cuda"):
            pass
    assert ops.current_backend() == "torch"
