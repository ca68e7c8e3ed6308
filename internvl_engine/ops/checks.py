"""Argument checks of the kernel contract, run before every op on every backend so that a wrong device, dtype,
shape or layout raises KernelInputError naming the op and the tensor, never a crash or a silent misread inside a
kernel. They read only metadata (no host synchronisation).

Layouts: activations of norms and pixel_shuffle are contiguous. q/k/v may be token-strided views (slices of one
packed qkv matmul output): stride(0) is free, heads and head dim are dense (stride(1) == D, stride(2) == 1).
KV caches, block tables and index tensors are contiguous.
"""
from __future__ import annotations

import torch

from ..errors import KernelInputError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fail(op: str, msg: str):
    raise KernelInputError(f"{op}: {msg}")


def _desc(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


def tensor(op, name, t, *, ndim=None, dtype=None, device=None, contiguous=True):
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        fail(op, f"{name} must have {ndim} dimensions, got {_desc(t)}")
    if dtype is not None and t.dtype not in (dtype if isinstance(dtype, tuple) else (dtype,)):
        want = dtype if isinstance(dtype, tuple) else (dtype,)
        fail(op, f"{name} must be {'/'.join(str(d).replace('torch.', '') for d in want)}, got {_desc(t)}")
    if device is not None and t.device != device:
        fail(op, f"{name} is on {t.device} but the other inputs are on {device}")
    if contiguous and not t.is_contiguous():
        fail(op, f"{name} must be contiguous, got strides {t.stride()} for {_desc(t)}")


def heads(op, name, t, n_heads=None, head_dim=None, *, dtype, device):
    """[T, heads, D] with dense heads and D; the token stride is free."""
    tensor(op, name, t, ndim=3, dtype=dtype, device=device, contiguous=False)
    if n_heads is not None and t.shape[1] != n_heads or head_dim is not None and t.shape[2] != head_dim:
        fail(op, f"{name} must be [T, {n_heads}, {head_dim}], got {_desc(t)}")
    if t.stride(2) != 1 or t.stride(1) != t.shape[2] or t.stride(0) < t.shape[1] * t.shape[2]:
        fail(op, f"{name} must have dense heads and head dim (strides (any, {t.shape[2]}, 1)), got strides "
                 f"{t.stride()}")


def same_shape(op, a_name, a, b_name, b):
    if a.shape != b.shape:
        fail(op, f"{b_name} {tuple(b.shape)} must have the shape of {a_name} {tuple(a.shape)}")


def _norm(op, x, weight):
    tensor(op, "x", x, dtype=FLOAT_DTYPES)
    tensor(op, "weight", weight, ndim=1, dtype=x.dtype, device=x.device)
    if x.dim() == 0 or weight.shape[0] != x.shape[-1]:
        fail(op, f"weight {tuple(weight.shape)} must match the last dimension of x {tuple(x.shape)}")


def rms_norm(x, weight, eps, residual=None):
    op = "rms_norm"
    _norm(op, x, weight)
    if residual is not None:
        tensor(op, "residual", residual, dtype=x.dtype, device=x.device)
        same_shape(op, "x", x, "residual", residual)


def layer_norm(x, weight, bias, eps):
    op = "layer_norm"
    _norm(op, x, weight)
    if bias is not None:
        tensor(op, "bias", bias, ndim=1, dtype=x.dtype, device=x.device)
        same_shape(op, "weight", weight, "bias", bias)


def pixel_shuffle(features, scale=0.5):
    op = "pixel_shuffle"
    tensor(op, "features", features, ndim=3, dtype=FLOAT_DTYPES)
    r = round(1 / scale) if scale > 0 else 0
    if r < 1 or abs(r * scale - 1) > 1e-6:
        fail(op, f"scale must be 1/r for an integer r >= 1, got {scale}")
    side = round(features.shape[1] ** 0.5)
    if side * side != features.shape[1] or side % r:
        fail(op, f"features {tuple(features.shape)} must hold a square map of S*S tokens with S divisible by {r}")


def rotary(q, k, positions, cos_sin):
    op = "rotary"
    if not isinstance(q, torch.Tensor):
        fail(op, f"q must be a torch.Tensor, got {type(q).__name__}")
    heads(op, "q", q, dtype=FLOAT_DTYPES, device=q.device)
    d = q.shape[2]
    heads(op, "k", k, head_dim=d, dtype=q.dtype, device=q.device)
    if k.shape[0] != q.shape[0]:
        fail(op, f"q has {q.shape[0]} tokens but k has {k.shape[0]}")
    if d % 2:
        fail(op, f"head dim must be even, got {d}")
    tensor(op, "positions", positions, ndim=1, dtype=torch.int64, device=q.device)
    if positions.shape[0] != q.shape[0]:
        fail(op, f"positions has {positions.shape[0]} entries for {q.shape[0]} tokens")
    tensor(op, "cos_sin", cos_sin, ndim=2, dtype=torch.float32, device=q.device)
    if cos_sin.shape[1] != d:
        fail(op, f"cos_sin must be [P, {d}], got {tuple(cos_sin.shape)}")


def kv_cache(op, k_cache, v_cache, kv_heads=None, head_dim=None, *, dtype, device):
    tensor(op, "k_cache", k_cache, ndim=4, dtype=dtype, device=device)
    tensor(op, "v_cache", v_cache, ndim=4, dtype=dtype, device=device)
    same_shape(op, "k_cache", k_cache, "v_cache", v_cache)
    if kv_heads is not None and (k_cache.shape[2], k_cache.shape[3]) != (kv_heads, head_dim):
        fail(op, f"caches must be [num_blocks, block_size, {kv_heads}, {head_dim}], got {tuple(k_cache.shape)}")


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping):
    op = "write_kv_cache"
    if not isinstance(k, torch.Tensor):
        fail(op, f"k must be a torch.Tensor, got {type(k).__name__}")
    heads(op, "k", k, dtype=FLOAT_DTYPES, device=k.device)
    heads(op, "v", v, k.shape[1], k.shape[2], dtype=k.dtype, device=k.device)
    if v.shape[0] != k.shape[0]:
        fail(op, f"k has {k.shape[0]} tokens but v has {v.shape[0]}")
    kv_cache(op, k_cache, v_cache, k.shape[1], k.shape[2], dtype=k.dtype, device=k.device)
    tensor(op, "slot_mapping", slot_mapping, ndim=1, dtype=torch.int64, device=k.device)
    if slot_mapping.shape[0] != k.shape[0]:
        fail(op, f"slot_mapping has {slot_mapping.shape[0]} entries for {k.shape[0]} tokens")


def flash_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale):
    op = "flash_attention"
    if not isinstance(q, torch.Tensor):
        fail(op, f"q must be a torch.Tensor, got {type(q).__name__}")
    heads(op, "q", q, dtype=FLOAT_DTYPES, device=q.device)
    heads(op, "k", k, head_dim=q.shape[2], dtype=q.dtype, device=q.device)
    heads(op, "v", v, k.shape[1], q.shape[2], dtype=q.dtype, device=q.device)
    if v.shape[0] != k.shape[0]:
        fail(op, f"k has {k.shape[0]} tokens but v has {v.shape[0]}")
    if q.shape[1] % k.shape[1]:
        fail(op, f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]})")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        tensor(op, name, cu, ndim=1, dtype=torch.int32, device=q.device)
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0] or cu_seqlens_q.shape[0] < 1:
        fail(op, f"cu_seqlens_q {tuple(cu_seqlens_q.shape)} and cu_seqlens_k {tuple(cu_seqlens_k.shape)} must both "
                 "be [batch + 1]")
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(n, torch.Tensor) or int(n) != n or n < 0:
            fail(op, f"{name} must be a non-negative host int, got {n!r}")


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, scale):
    _paged("paged_attention", q, k_cache, v_cache, block_tables, seq_lens)


def _paged(op, q, k_cache, v_cache, block_tables, seq_lens):
    if not isinstance(q, torch.Tensor):
        fail(op, f"q must be a torch.Tensor, got {type(q).__name__}")
    heads(op, "q", q, dtype=FLOAT_DTYPES, device=q.device)
    kv_cache(op, k_cache, v_cache, dtype=q.dtype, device=q.device)
    if k_cache.shape[3] != q.shape[2] or q.shape[1] % k_cache.shape[2]:
        fail(op, f"q {tuple(q.shape)} does not fit caches {tuple(k_cache.shape)}: the head dims must agree and "
                 "query heads be a multiple of KV heads")
    tensor(op, "block_tables", block_tables, ndim=2, dtype=torch.int32, device=q.device)
    tensor(op, "seq_lens", seq_lens, ndim=1, dtype=torch.int32, device=q.device)
    if block_tables.shape[0] != q.shape[0] or seq_lens.shape[0] != q.shape[0]:
        fail(op, f"block_tables {tuple(block_tables.shape)} and seq_lens {tuple(seq_lens.shape)} must have one row "
                 f"per query ({q.shape[0]})")


def awq_gemm(x, qweight, qzeros, scales, bias=None, group_size=128):
    op = "awq_gemm"
    tensor(op, "x", x, ndim=2, dtype=FLOAT_DTYPES)
    k = x.shape[1]
    tensor(op, "qweight", qweight, ndim=2, dtype=torch.int32, device=x.device)
    tensor(op, "qzeros", qzeros, ndim=2, dtype=torch.int32, device=x.device)
    tensor(op, "scales", scales, ndim=2, dtype=FLOAT_DTYPES, device=x.device)
    if group_size != 128:
        fail(op, f"group_size must be 128, got {group_size}")
    n = scales.shape[1]
    if k == 0 or k % group_size or n % 8:
        fail(op, f"K ({k}) must be a positive multiple of {group_size} and N ({n}) a multiple of 8")
    if tuple(qweight.shape) != (k, n // 8) or tuple(qzeros.shape) != (k // group_size, n // 8) \
            or scales.shape[0] != k // group_size:
        fail(op, f"for x {_desc(x)} and N {n}: qweight must be {(k, n // 8)}, qzeros {(k // group_size, n // 8)}, "
                 f"scales {(k // group_size, n)}; got {tuple(qweight.shape)}, {tuple(qzeros.shape)}, "
                 f"{tuple(scales.shape)}")
    if bias is not None:
        tensor(op, "bias", bias, ndim=1, dtype=FLOAT_DTYPES, device=x.device)
        if bias.shape[0] != n:
            fail(op, f"bias must have {n} elements, got {_desc(bias)}")


def fp8_gemm(x, weight, weight_scale, bias=None):
    op = "fp8_gemm"
    tensor(op, "x", x, ndim=2, dtype=FLOAT_DTYPES)
    tensor(op, "weight", weight, ndim=2, dtype=torch.float8_e4m3fn, device=x.device)
    tensor(op, "weight_scale", weight_scale, ndim=2, dtype=FLOAT_DTYPES, device=x.device)
    if x.shape[1] == 0:
        fail(op, f"x {_desc(x)} has no input features")
    if weight.shape[1] != x.shape[1] or tuple(weight_scale.shape) != (weight.shape[0], 1):
        fail(op, f"weight must be [N, {x.shape[1]}] and weight_scale [N, 1]; got {_desc(weight)}, "
                 f"{_desc(weight_scale)}")
    if bias is not None:
        tensor(op, "bias", bias, ndim=1, dtype=FLOAT_DTYPES, device=x.device)
        if bias.shape[0] != weight.shape[0]:
            fail(op, f"bias must have {weight.shape[0]} elements, got {_desc(bias)}")


def fused_moe(x, w13, w2, topk_weights, topk_ids):
    """Shapes only: whether every id lies in [0, E) is data (a backend that reads the ids on the host raises, the
    Triton kernel drops such slots: ops/moe_ops.py, kernels/fused_moe.py)."""
    op = "fused_moe"
    tensor(op, "x", x, ndim=2, dtype=FLOAT_DTYPES)
    tensor(op, "w13", w13, ndim=3, dtype=x.dtype, device=x.device)
    tensor(op, "w2", w2, ndim=3, dtype=x.dtype, device=x.device)
    tensor(op, "topk_weights", topk_weights, ndim=2, dtype=torch.float32, device=x.device)
    tensor(op, "topk_ids", topk_ids, ndim=2, dtype=(torch.int32, torch.int64), device=x.device)
    t, hd = x.shape
    e, f2 = w13.shape[:2]
    if e == 0 or hd == 0 or f2 == 0 or f2 % 2 or w13.shape[2] != hd:
        fail(op, f"w13 must be [E, 2F, {hd}] with E, F >= 1 (gate rows, then up rows) for x {_desc(x)}, got "
                 f"{_desc(w13)}")
    if tuple(w2.shape) != (e, hd, f2 // 2):
        fail(op, f"w2 must be [E, Hd, F] = {(e, hd, f2 // 2)} for w13 {tuple(w13.shape)}, got {_desc(w2)}")
    if topk_ids.shape[0] != t or topk_weights.shape != topk_ids.shape:
        fail(op, f"topk_weights {tuple(topk_weights.shape)} and topk_ids {tuple(topk_ids.shape)} must both be "
                 f"[{t}, k] (one row per token of x)")
    if not 1 <= topk_ids.shape[1] <= e:
        fail(op, f"k (topk_ids.shape[1] = {topk_ids.shape[1]}) must lie in [1, E = {e}]")


# ------------------------------------------------------------------------------ fused decode (issue 3.6)
def _rows(op, x):
    tensor(op, "x", x, ndim=2, dtype=FLOAT_DTYPES)
    if x.shape[0] == 0 or x.shape[1] == 0:
        fail(op, f"x must be [B, C] with B, C >= 1, got {_desc(x)}")


def _weight(op, name, w, out_features, in_features, x, x_name="x"):
    tensor(op, name, w, ndim=2, dtype=x.dtype, device=x.device)
    if w.shape[1] != in_features or (out_features is not None and w.shape[0] != out_features):
        fail(op, f"{name} must be [{'N' if out_features is None else out_features}, {in_features}] for {x_name} "
                 f"{_desc(x)}, got {_desc(w)}")


def _vector(op, name, v, n, x):
    if v is not None:
        tensor(op, name, v, ndim=1, dtype=x.dtype, device=x.device)
        if v.shape[0] != n:
            fail(op, f"{name} must have {n} elements, got {_desc(v)}")


def decode_qkv(x, norm_weight, eps, qkv_weight, qkv_bias, q_norm_weight, k_norm_weight, positions, cos_sin,
               k_cache, v_cache, slot_mapping):
    op = "decode_qkv"
    _rows(op, x)
    b, c = x.shape
    _vector(op, "norm_weight", norm_weight, c, x)
    if norm_weight is None:
        fail(op, "norm_weight must be a tensor, got None")
    kv_cache(op, k_cache, v_cache, dtype=x.dtype, device=x.device)
    hk, d = k_cache.shape[2], k_cache.shape[3]
    _weight(op, "qkv_weight", qkv_weight, None, c, x)
    n = qkv_weight.shape[0]
    if d % 2 or n % d or n // d <= 2 * hk or (n // d - 2 * hk) % hk:
        fail(op, f"qkv_weight {_desc(qkv_weight)} must hold (H + 2 * {hk}) heads of {d} rows (H a multiple of the "
                 f"caches' {hk} KV heads, head dim even)")
    _vector(op, "qkv_bias", qkv_bias, n, x)
    if (q_norm_weight is None) != (k_norm_weight is None):
        fail(op, "q_norm_weight and k_norm_weight must both be given (Qwen3) or both be None")
    _vector(op, "q_norm_weight", q_norm_weight, d, x)
    _vector(op, "k_norm_weight", k_norm_weight, d, x)
    tensor(op, "positions", positions, ndim=1, dtype=torch.int64, device=x.device)
    tensor(op, "slot_mapping", slot_mapping, ndim=1, dtype=torch.int64, device=x.device)
    if positions.shape[0] != b or slot_mapping.shape[0] != b:
        fail(op, f"positions {tuple(positions.shape)} and slot_mapping {tuple(slot_mapping.shape)} must have one "
                 f"entry per row of x ({b})")
    tensor(op, "cos_sin", cos_sin, ndim=2, dtype=torch.float32, device=x.device)
    if cos_sin.shape[1] != d:
        fail(op, f"cos_sin must be [P, {d}], got {tuple(cos_sin.shape)}")


def decode_gemv_residual(x, weight, bias, residual):
    op = "decode_gemv_residual"
    _rows(op, x)
    _weight(op, "weight", weight, None, x.shape[1], x)
    n = weight.shape[0]
    _vector(op, "bias", bias, n, x)
    tensor(op, "residual", residual, ndim=2, dtype=x.dtype, device=x.device)
    if tuple(residual.shape) != (x.shape[0], n):
        fail(op, f"residual must be [{x.shape[0]}, {n}], got {_desc(residual)}")


def decode_attention_o(q, k_cache, v_cache, block_tables, seq_lens, scale, o_weight, o_bias):
    op = "decode_attention_o"
    _paged(op, q, k_cache, v_cache, block_tables, seq_lens)
    if q.shape[0] == 0:
        fail(op, f"q must hold at least one token, got {_desc(q)}")
    width = q.shape[1] * q.shape[2]
    tensor(op, "o_weight", o_weight, ndim=2, dtype=q.dtype, device=q.device)
    if o_weight.shape[1] != width or o_weight.shape[0] == 0:
        fail(op, f"o_weight must be [C, heads * head_dim] = [C, {q.shape[1]} * {q.shape[2]} = {width}] for q "
                 f"{_desc(q)}, got {_desc(o_weight)}")
    if o_bias is not None:
        tensor(op, "o_bias", o_bias, ndim=1, dtype=q.dtype, device=q.device)
        if o_bias.shape[0] != o_weight.shape[0]:
            fail(op, f"o_bias must have {o_weight.shape[0]} elements (o_weight's rows), got {_desc(o_bias)}")


def decode_gate_up(partials, residual, norm_weight, eps, weight, bias):
    op = "decode_gate_up"
    tensor(op, "residual", residual, ndim=2, dtype=FLOAT_DTYPES)
    if residual.shape[0] == 0 or residual.shape[1] == 0:
        fail(op, f"residual must be [B, C] with B, C >= 1, got {_desc(residual)}")
    b, c = residual.shape
    # decode_attention_o's partials: fp32 (the Triton kernel's per-head sums) or the residual's dtype (G = 1, the
    # compositions' rounded o_proj output)
    tensor(op, "partials", partials, ndim=3, dtype=(torch.float32, residual.dtype), device=residual.device)
    if partials.shape[0] < 1 or tuple(partials.shape[1:]) != (b, c):
        fail(op, f"partials must be [G, {b}, {c}] with G >= 1 for residual {_desc(residual)}, got {_desc(partials)}")
    if norm_weight is None:
        fail(op, "norm_weight must be a tensor, got None")
    _vector(op, "norm_weight", norm_weight, c, residual)
    _weight(op, "weight", weight, None, c, residual, "residual")
    if weight.shape[0] % 2 or weight.shape[0] == 0:
        fail(op, f"weight must be [2F, {c}] (gate rows, then up rows), got {_desc(weight)}")
    _vector(op, "bias", bias, weight.shape[0], residual)
