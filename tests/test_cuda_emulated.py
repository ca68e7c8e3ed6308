"""The CUDA kernels of csrc/cuda, compiled for the host and run by the CPU emulator in tests/cuda_emu, against the
same oracles (ops.<op>_ref) and with the same tolerance rules as the backend tests in tests/test_<family>.py.

This is how a machine without a GPU (CI) checks the CUDA kernels' logic: indexing, masking, GQA mapping, tiling,
online softmax, split-KV merging, vector-width dispatch and in-place/strided layouts. It says nothing about speed,
GPU floating-point details or warp-synchronous scheduling (see tests/cuda_emu/emu.h for what the emulator models).
Every CUDA thread is an OS thread and every barrier a context switch, so the shapes are smaller than the ones the
backend tests use (flash attention up to 300 tokens, a 1025-token sequence only for paged attention).
"""
import pytest
import torch

from cuda_emu import build as emu_build
from internvl_engine import ops
from internvl_engine.layers.rotary import RotaryEmbedding
from internvl_engine.ops import checks
from internvl_engine.ops.ext_ops import ExtensionOps
from kernel_cases import assert_attention_close, assert_close, attention_refs, packed_qkv
from test_flash_attention import HEADS, SEQS
from test_norm import _inputs as norm_inputs
from test_paged_attention import _cache

_MISSING = [what for what, found in (("a C++ compiler (g++)", emu_build.find_cxx()),
                                     ("the CUDA headers (cuda_runtime.h; nvcc or CUDA_HOME)",
                                      emu_build.find_cuda_include())) if found is None]
pytestmark = pytest.mark.skipif(bool(_MISSING), reason=f"the emulated CUDA kernels need {' and '.join(_MISSING)}")

HEAD_DIMS = (16, 32, 64, 128)  # the head dims csrc/cuda instantiates


@pytest.fixture(scope="session")
def emu_lib(tmp_path_factory):
    """The csrc/cuda launchers built for the emulator, once per session."""
    # conftest.SESSION_PREFIX: the module sweep leaves it
    return emu_build.build(tmp_path_factory.mktemp("session-cuda_emu"))


def _ops(lib, num_splits=None):
    return ExtensionOps(lib, "cpu", "cuda-emulated", head_dims=HEAD_DIMS, cuda_abi=True, num_splits=num_splits)


@pytest.fixture(scope="session")
def emu(emu_lib):
    return _ops(emu_lib)


def run(impl, op, *args, **kwargs):
    """What the dispatcher does: the contract's argument checks, then the implementation."""
    getattr(checks, op)(*args, **kwargs)
    return getattr(impl, op)(*args, **kwargs)


# ---- norms (tests/test_norm.py) ----

NORM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# hidden 769: the scalar path with 769 threads; 64 / 896 / 1024: 16-byte vectors
NORM_SHAPES = [(7, 769), (65, 64), (3, 896)]


@pytest.mark.parametrize("dtype", NORM_DTYPES)
@pytest.mark.parametrize("tokens,hidden", NORM_SHAPES)
def test_rms_norm(emu, dtype, tokens, hidden):
    x, r, w, _ = norm_inputs(tokens, hidden, dtype, "cpu")
    x0, r0 = x.clone(), r.clone()
    y = run(emu, "rms_norm", x, w, 1e-6)
    y2, s = run(emu, "rms_norm", x, w, 1e-6, r)
    assert_close(y, ops.rms_norm_ref(x, w, 1e-6), dtype)
    y2_ref, s_ref = ops.rms_norm_ref(x, w, 1e-6, r)
    assert_close(y2, y2_ref, dtype)
    assert_close(s, s_ref, dtype)
    assert torch.equal(x, x0) and torch.equal(r, r0), "inputs must not be modified"


@pytest.mark.parametrize("dtype", NORM_DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(7, 769), (65, 64), (2, 1024)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm(emu, dtype, tokens, hidden, with_bias):
    x, _, w, b = norm_inputs(tokens, hidden, dtype, "cpu")
    x = x + 5  # a large mean: the variance must not be computed as E[x^2] - E[x]^2 in low precision
    b = b if with_bias else None
    assert_close(run(emu, "layer_norm", x, w, b, 1e-6), ops.layer_norm_ref(x, w, b, 1e-6), dtype)


def test_norms_unaligned_rows_take_the_scalar_path(emu):
    """A base address off the 16-byte grid must fall back to element access (cols alone would allow vectors)."""
    x, r, w, b = norm_inputs(5, 65, torch.float32, "cpu")
    x, r = x[:, 1:].contiguous(), r[:, 1:].contiguous()
    xs = torch.empty(x.numel() + 1)[1:].view_as(x).copy_(x)  # 4 bytes past an aligned allocation
    assert xs.data_ptr() % 16
    w = w[1:].contiguous()
    assert_close(run(emu, "rms_norm", xs, w, 1e-6), ops.rms_norm_ref(x, w, 1e-6), torch.float32)
    assert_close(run(emu, "layer_norm", xs, w, b[1:].contiguous(), 1e-6),
                 ops.layer_norm_ref(x, w, b[1:].contiguous(), 1e-6), torch.float32)


# ---- pixel_shuffle (tests/test_pixel_shuffle.py) ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tiles,side,channels,scale", [(3, 32, 24, 0.5), (1, 4, 769, 0.5), (2, 6, 7, 1 / 3),
                                                       (1, 32, 1024, 0.5)])
def test_pixel_shuffle(emu, dtype, tiles, side, channels, scale):
    f = torch.randn(tiles, side * side, channels).to(dtype)
    assert torch.equal(run(emu, "pixel_shuffle", f, scale), ops.pixel_shuffle_ref(f, scale))


# ---- rotary (tests/test_rotary.py) ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", [(7, 6, 1, 64), (129, 14, 2, 64), (13, 7, 7, 128),
                                                            (5, 4, 2, 16)])
def test_rotary(emu, dtype, tokens, heads, kv_heads, head_dim):
    table = RotaryEmbedding(head_dim, 1e6, 4096).table("cpu")
    q, k, v = packed_qkv(tokens, heads, kv_heads, head_dim, dtype, "cpu")
    pos = torch.randint(0, 4096, (tokens,), generator=torch.Generator().manual_seed(3))
    q_ref, k_ref, v0 = q.clone(), k.clone(), v.clone()
    ops.rotary_ref(q_ref, k_ref, pos, table)
    q_out, k_out = run(emu, "rotary", q, k, pos, table)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr(), "rotary works in place"
    assert_close(q, q_ref, dtype)
    assert_close(k, k_ref, dtype)
    assert torch.equal(v, v0), "v, beside k in the packed tensor, must be untouched"


# ---- write_kv_cache (tests/test_kv_cache.py) ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,kv_heads,head_dim,block_size", [(7, 1, 64, 16), (1025, 2, 128, 32),
                                                                 (33, 7, 64, 16), (3, 2, 16, 32)])
def test_write_kv_cache(emu, dtype, tokens, kv_heads, head_dim, block_size):
    g = torch.Generator().manual_seed(tokens)
    _, k, v = packed_qkv(tokens, 2, kv_heads, head_dim, dtype, "cpu")
    num_blocks = -(-tokens // block_size) * 2
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[torch.rand(tokens, generator=g) < 0.3] = -1
    caches = [torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype) for _ in range(4)]
    run(emu, "write_kv_cache", k, v, caches[0], caches[1], slots)
    ops.write_kv_cache_ref(k, v, caches[2], caches[3], slots)
    for out, ref in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(out.isnan(), ref.isnan())
        assert torch.equal(out.nan_to_num(), ref.nan_to_num())


def test_write_kv_cache_all_skipped(emu):
    k = torch.randn(3, 2, 16)
    caches = [torch.zeros(2, 16, 2, 16) for _ in range(2)]
    run(emu, "write_kv_cache", k, k, caches[0], caches[1], torch.full((3,), -1))
    assert not caches[0].any() and not caches[1].any()


# ---- flash_attention (tests/test_flash_attention.py) ----

def _flash(impl, dtype, lq, lk, heads, kv_heads, head_dim, causal):
    q, _, _ = packed_qkv(sum(lq), heads, kv_heads, head_dim, dtype, "cpu", seed=1)
    _, k, v = packed_qkv(sum(lk), heads, kv_heads, head_dim, dtype, "cpu", seed=2)
    cu_q = torch.tensor([0] + lq, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + lk, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    args = (cu_q, cu_k, max(lq), max(lk), causal, head_dim ** -0.5)
    ref, lowp = attention_refs(ops.flash_attention_ref, q, k, v, *args)
    out = run(impl, "flash_attention", q, k, v, *args)
    assert out.shape == q.shape and out.is_contiguous()
    assert_attention_close(out, ref, lowp, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", HEADS)  # GQA ratios 1, 2, 6, 7; head dims 16, 32, 64, 128
@pytest.mark.parametrize("seqs,causal", [("7", True), ("7", False), ("prefix", True)])
def test_flash_attention(emu, dtype, heads, kv_heads, head_dim, seqs, causal):
    _flash(emu, dtype, *SEQS[seqs], heads, kv_heads, head_dim, causal)


# The varlen batch [7, 300, 1, 64] (several query blocks, ten key tiles, causal block skipping) is costly under
# the emulator: each head configuration once, alternating dtype and mask.
@pytest.mark.parametrize("heads,kv_heads,head_dim,dtype,causal", [
    (4, 4, 64, torch.float32, False), (6, 1, 64, torch.bfloat16, True), (7, 1, 128, torch.float32, True),
    (6, 2, 32, torch.bfloat16, False), (4, 2, 16, torch.float32, True)])
def test_flash_attention_varlen(emu, heads, kv_heads, head_dim, dtype, causal):
    _flash(emu, dtype, *SEQS["varlen"], heads, kv_heads, head_dim, causal)


def test_flash_attention_empty_key_sequence(emu):
    """A sequence with queries but no keys (bidirectional) gets zeros; its neighbours are unaffected."""
    q, _, _ = packed_qkv(9, 2, 1, 32, torch.float32, "cpu", seed=1)
    _, k, v = packed_qkv(5, 2, 1, 32, torch.float32, "cpu", seed=2)
    cu_q, cu_k = torch.tensor([0, 4, 9], dtype=torch.int32), torch.tensor([0, 0, 5], dtype=torch.int32)
    out = run(emu, "flash_attention", q, k, v, cu_q, cu_k, 5, 5, False, 32 ** -0.5)
    assert torch.equal(out[:4], torch.zeros_like(out[:4]))
    ref = ops.flash_attention_ref(q[4:], k, v, torch.tensor([0, 5], dtype=torch.int32),
                                  torch.tensor([0, 5], dtype=torch.int32), 5, 5, False, 32 ** -0.5)
    assert_close(out[4:], ref, torch.float32)


# ---- paged_attention (tests/test_paged_attention.py), single pass and split-KV ----

@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 64), (6, 1, 64), (7, 1, 128), (14, 2, 64), (4, 2, 16)])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("lens", [[1], [37, 1, 64, 300]])
def test_paged_attention(emu_lib, num_splits, dtype, heads, kv_heads, head_dim, block_size, lens):
    _paged(_ops(emu_lib, num_splits), dtype, heads, kv_heads, head_dim, block_size, lens)


@pytest.mark.parametrize("num_splits", [1, 5])
def test_paged_attention_1025_tokens(emu_lib, num_splits):
    _paged(_ops(emu_lib, num_splits), torch.bfloat16, 7, 1, 128, 16, [1025])


def test_paged_attention_empty_and_strided(emu_lib):
    """seq_len 0 gives zeros, also merged from all-empty splits; q may be a token-strided view."""
    k_cache, v_cache, tables, seq_lens = _cache([0, 45], 16, 2, 32, torch.float32, "cpu", seed=1)
    q = torch.randn(2, 3 * 4 * 32)[:, 32:32 + 4 * 32].view(2, 4, 32)  # token stride 384
    ref32 = ops.paged_attention_ref(q, k_cache, v_cache, tables, seq_lens, 0.2)
    for splits in (1, 2, 4):
        out = run(_ops(emu_lib, splits), "paged_attention", q, k_cache, v_cache, tables, seq_lens, 0.2)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert_close(out[1], ref32[1], torch.float32)


def _paged(impl, dtype, heads, kv_heads, head_dim, block_size, lens):
    k_cache, v_cache, tables, seq_lens = _cache(lens, block_size, kv_heads, head_dim, dtype, "cpu", seed=len(lens))
    q, _, _ = packed_qkv(len(lens), heads, kv_heads, head_dim, dtype, "cpu", seed=5)  # a token-strided view
    scale = head_dim ** -0.5
    ref, lowp = attention_refs(ops.paged_attention_ref, q, k_cache, v_cache, tables, seq_lens, scale)
    out = run(impl, "paged_attention", q, k_cache, v_cache, tables, seq_lens, scale)
    assert out.shape == q.shape
    assert_attention_close(out, ref, lowp, dtype)


def test_paged_attention_is_batch_invariant(emu_lib):
    """Default split-KV (one split per 256 tokens of capacity): bit-identical alone, in a batch and with a wider
    block table, as tests/test_paged_attention.py checks for the other kernels."""
    impl, lens, bs = _ops(emu_lib), [1024, 37, 300], 16
    k_cache, v_cache, tables, seq_lens = _cache(lens, bs, 2, 64, torch.bfloat16, "cpu", seed=3)
    q = packed_qkv(len(lens), 8, 2, 64, torch.bfloat16, "cpu", seed=4)[0].contiguous()
    batch = run(impl, "paged_attention", q, k_cache, v_cache, tables, seq_lens, 0.125)
    wide = torch.cat([tables, tables[:, :1].expand(-1, 40)], 1).contiguous()
    for i, n in enumerate(lens):
        for t in (tables[i:i + 1, :-(-n // bs)].contiguous(), wide[i:i + 1]):
            alone = run(impl, "paged_attention", q[i:i + 1], k_cache, v_cache, t, seq_lens[i:i + 1], 0.125)
            assert torch.equal(alone[0], batch[i]), (i, t.shape)
