"""Fused decode kernels for batches of 1-8 tokens (issue 3.6): a decoder layer's decode step in four kernels, with the
norms, rotary, the KV write, attention, SiLU*mul and the residual adds folded into the GEMVs.

- decode_qkv: RMSNorm prologue, q/k/v GEMV, then per head (a program owns 16 rotary pairs of one head, or the whole
  head with q/k norm, for one batch tile) the bias, Qwen3's q/k RMSNorm, NeoX rotary and the store: q to its
  output, k and v into the paged caches at their slots.
- decode_attention_o: per (token, query head, output split) the head's paged decode attention, then its slice of
  o_proj: partials [H, B, C] in fp32 whose sum over heads is o_proj's output (o_proj is linear in its input heads).
- decode_gate_up: the partials summed (in head order) into the residual in the RMSNorm prologue, then the gate and up
  GEMVs of the same F columns in one program, silu(gate) * up; returns the new residual too.
- decode_gemv_residual: y = residual + (x W^T + b) (down_proj).

GEMV design (as kernels/awq_gemm.py's decode path, for dense weights): a program owns BLOCK_N output features and walks
all of K, so no atomics (decode_attention_o's per-head partials are split-K over heads, reduced in a fixed order by
the next kernel): results are deterministic and do not depend on the batch. The RMSNorm prologue is recomputed by
every program (two passes over x's <= 8 rows: the sum of squares, then the normalised chunks), which reads B x C
activations per program (G x B x C partials for decode_gate_up) against its BLOCK_N x C weight slice. The dot tile
has 16 rows (tl.dot's minimum), masked past B. Weights are [N, K] row-major (nn.Linear's layout), loaded as
[BLOCK_K, BLOCK_N] tiles. Roundings follow the default path's Triton kernels (norm.py, rotary.py): every stored
intermediate is rounded to the activation dtype where the unfused layer would store it, with _tuning.to_dtype
(nearest-even under the interpreter too). Under the interpreter (CPU tests) blocks are larger: few, large programs.

Programmatic dependent launch (PDL, Hopper and later; opt-in with INTERNVL_ENGINE_PDL=1 until a device run measures
it): each kernel is launched with launch_pdl, so it may start while the kernel before it finishes; it waits for that
kernel's writes (griddepcontrol.wait) before reading anything, and once its own K loop (decode_attention_o: its
attention loop) is done lets the next kernel launch (griddepcontrol.launch_dependents). With all four ops of a layer
here, a whole decode step but the embedding, the final norm and the logits is one PDL chain. A kernel that follows
without PDL (torch's ops) waits for completion as usual, and every dependent passes the wait before it triggers its
own dependents, so writes two kernels back are complete too."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ._tuning import INTERPRET, LOG2E, dot_operand, next_pow2, row_max, row_sum, to_dtype
from .paged_attention import token_step

PDL = os.environ.get("INTERNVL_ENGINE_PDL") == "1"  # read at import; tests set the module global

_BLOCK_B = 16                         # tl.dot's minimum M; rows past B are masked
_HEAD_BLOCK = 16                      # rotary pairs per decode_qkv program without q/k norm (tl.dot's minimum N)
# The helpers below are inlined by Triton on a GPU; under the interpreter they stay plain Python (an interpreted
# @triton.jit call re-patches triton.language on every call: _tuning.py). There the products are a broadcast and a
# row sum over B rows, not a dot padded to 16 (the interpreter's dot is numpy's matmul without BLAS), and K is
# walked in the largest blocks that keep a program's [B, BLOCK_K, BLOCK_N] product within Triton's 2^20 elements.
_helper = (lambda fn: fn) if INTERPRET else triton.jit


def _block_n(n: int) -> int:
    """GEMV output features per program: 16 for N <= 2048 (InternVL3-1B / 2B o_proj and down_proj: 56 / 96
    programs for an H100's 132 SMs), else 32 (1B gate/up: 152 programs); 256 under the interpreter."""
    if INTERPRET:
        return 256
    return 16 if n <= 2048 else 32


_SMS = 132  # an H100's SM count: decode_attention_o's grid aims past it at batch 1 (a device profile may retune)


def _attention_o_split(b: int, h: int, c: int, block_d: int, interpret: bool = INTERPRET) -> tuple[int, int, int]:
    """(BLOCK_C, splits, outputs per split) of decode_attention_o's grid (B, H, splits). A program per (token, query
    head) alone is 14 programs for InternVL3-1B at B = 1 (12 for 2B) on 132 SMs, each reading a 114 KB (393 KB)
    slice of o_weight: too few to pull the weights at full bandwidth. So the C outputs are split, in runs of a
    multiple of 16, until B * H * splits reaches the SM count (1B at B = 1: 10 splits of 96 outputs, 140 programs;
    2B: 11 of 144, 132 programs; 1B at B = 8: 2 splits, 224 programs). Each split recomputes its head's attention:
    a sequence's KV is read splits x (H / HK) times, from L2 after the first, which is cheap at chat lengths and
    grows with the context (models/decode_fused.py's docstring). The values do not depend on the split (an output's
    sum runs over the head's D in one program), so the batch does not change a token's result. BLOCK_C keeps the
    [BLOCK_D, BLOCK_C] weight tile at 8K elements (64 fp32 registers a thread at 4 warps; a split walks its outputs
    in BLOCK_C chunks, the last one masked); under the interpreter one split of the whole width."""
    if interpret:
        return min(next_pow2(c), (1 << 18) // block_d), 1, c
    splits = min(triton.cdiv(c, 16), triton.cdiv(_SMS, b * h))
    per = triton.cdiv(triton.cdiv(c, splits), 16) * 16
    block_c = min(max(16, 8192 // block_d), next_pow2(per))
    return block_c, triton.cdiv(c, per), per


def _block_b(b: int) -> int:
    return next_pow2(min(b, 8)) if INTERPRET else _BLOCK_B


def _block_k(k: int, block_b: int, block_n: int) -> int:
    return min(next_pow2(k), (1 << 20) // (block_b * block_n)) if INTERPRET else 128


if INTERPRET:
    def _mac(a, w, acc, DOT_PREC):  # noqa: N803 - the kernels' constexpr name
        """acc + a @ w for a [BLOCK_B, BLOCK_K], w [BLOCK_K, N] (fp32 products of exactly widened operands)."""
        return acc + row_sum(dot_operand(a)[:, :, None] * dot_operand(w)[None, :, :], 1)
else:
    @triton.jit
    def _mac(a, w, acc, DOT_PREC: tl.constexpr):
        return tl.dot(a, w, acc, input_precision=DOT_PREC)


def _dot_prec(x: torch.Tensor):
    # fp32 operands for fp32 x and under the interpreter (its bf16 dot multiplies raw bits: _tuning.py)
    return "ieee" if INTERPRET or x.dtype == torch.float32 else None


@_helper
def _rows_chunk(x_ptr, p_ptr, G, B, rb, bmask, k, K, PARTIALS: tl.constexpr):
    """Columns k of rows rb of the op's input row block [B, K], in x's dtype. With PARTIALS, x is the residual and
    the rows are residual + sum_g partials[g] (partials [G, B, K]: decode_attention_o's per-head o_proj sums): the
    partials summed in fp32 in g order and rounded (the o_proj output the default layer stores), then the fp32
    residual add rounded once (the norm's residual add), as ops/ref.py decode_gate_up_ref."""
    kmask = k < K
    mask = bmask[:, None] & kmask[None, :]
    offs = rb[:, None].to(tl.int64) * K + k[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if PARTIALS:
        acc = tl.zeros(x.shape, dtype=tl.float32)
        for g in range(0, G):
            acc += dot_operand(tl.load(p_ptr + g * B * K + offs, mask=mask, other=0.0)).to(tl.float32)
        x = to_dtype(to_dtype(acc, x.dtype).to(tl.float32) + dot_operand(x).to(tl.float32), x.dtype)
    return x


@_helper
def _row_inv_rms(x_ptr, p_ptr, G, B, rb, bmask, K, eps, PARTIALS: tl.constexpr, BLOCK_B: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of rows rb of the input rows [B, K] (_rows_chunk), in fp32."""
    rk = tl.arange(0, BLOCK_K)
    ssq = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        xf = _rows_chunk(x_ptr, p_ptr, G, B, rb, bmask, k0 + rk, K, PARTIALS).to(tl.float32)
        ssq += row_sum(xf * xf, 1)
    return tl.rsqrt(ssq / K + eps)


@_helper
def _normed(x, nw_ptr, k, K, inv):
    """RMSNorm of columns k of rows x, rounded as transformers' RMSNorm: normalise in fp32, round, scale, round."""
    yn = to_dtype(x.to(tl.float32) * inv[:, None], x.dtype)
    w = tl.load(nw_ptr + k, mask=k < K, other=0.0).to(tl.float32)
    return to_dtype(w[None, :] * yn.to(tl.float32), x.dtype)


@_helper
def _weight_tile(w_ptr, rows, rmask, k, K):
    """[BLOCK_K, len(rows)] tile of a row-major [N, K] weight: W^T's columns `rows` at K indices k."""
    return tl.load(w_ptr + rows[None, :].to(tl.int64) * K + k[:, None], mask=rmask[None, :] & (k < K)[:, None],
                   other=0.0)


@_helper
def _normed_gemv_pair(x_ptr, p_ptr, G, B, ro_ptr, write, nw_ptr, w_ptr, rb, bmask, rows1, rows2, rmask, K, eps,
                      PARTIALS: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """(RMSNorm(x) W[rows1]^T, RMSNorm(x) W[rows2]^T) in fp32 for rows rb of the input rows [B, K] (_rows_chunk)
    and a row-major [N, K] weight: two outputs of the same normed activations (a rotary pair's halves, or gate and
    up). With PARTIALS, the program where `write` holds also stores the rows it formed (residual') to ro_ptr."""
    inv = _row_inv_rms(x_ptr, p_ptr, G, B, rb, bmask, K, eps, PARTIALS, BLOCK_B, BLOCK_K)
    rk = tl.arange(0, BLOCK_K)
    acc1 = tl.zeros((BLOCK_B, rows1.shape[0]), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_B, rows1.shape[0]), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        x = _rows_chunk(x_ptr, p_ptr, G, B, rb, bmask, k, K, PARTIALS)
        if PARTIALS:
            tl.store(ro_ptr + rb[:, None].to(tl.int64) * K + k[None, :], x,
                     mask=(bmask & write)[:, None] & (k < K)[None, :])
        h = _normed(x, nw_ptr, k, K, inv)
        acc1 = _mac(h, _weight_tile(w_ptr, rows1, rmask, k, K), acc1, DOT_PREC)
        acc2 = _mac(h, _weight_tile(w_ptr, rows2, rmask, k, K), acc2, DOT_PREC)
    return acc1, acc2


@triton.jit
def _qkv_kernel(x_ptr, nw_ptr, w_ptr, b_ptr, qn_ptr, kn_ptr, pos_ptr, cs_ptr, slot_ptr, q_ptr, kc_ptr, vc_ptr,
                B, K, H, HK, eps, stride_cs,
                D: tl.constexpr, HALF: tl.constexpr, HAS_BIAS: tl.constexpr, QK_NORM: tl.constexpr,
                DOT_PREC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                USE_PDL: tl.constexpr):
    """Program (batch tile, head * parts + part): head < H a query head, then H <= head < H + HK a key head, then a
    value head; `part` owns rotary pairs [part * BLOCK_H, (part + 1) * BLOCK_H) of the head (all of them with q/k
    norm, whose sum of squares needs the whole head). The two halves of the pairs are two accumulators, so
    rotary's pairs (d, d + D/2) sit in the same lane."""
    parts = tl.cdiv(HALF, BLOCK_H)
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    head = tl.program_id(1) // parts
    bmask = rb < B
    rd = (tl.program_id(1) % parts) * BLOCK_H + tl.arange(0, BLOCK_H)
    dmask = rd < HALF
    if USE_PDL:
        gdc_wait()
    rows1 = head * D + rd          # the packed q/k/v weight holds H q heads, HK k heads, HK v heads, D rows each
    rows2 = rows1 + HALF
    acc1, acc2 = _normed_gemv_pair(x_ptr, x_ptr, 0, B, x_ptr, False, nw_ptr, w_ptr, rb, bmask, rows1, rows2, dmask,
                                   K, eps, False, DOT_PREC, BLOCK_B, BLOCK_K)
    if USE_PDL:
        gdc_launch_dependents()
    if HAS_BIAS:
        acc1 += tl.load(b_ptr + rows1, mask=dmask, other=0.0).to(tl.float32)[None, :]
        acc2 += tl.load(b_ptr + rows2, mask=dmask, other=0.0).to(tl.float32)[None, :]
    dtype = q_ptr.dtype.element_ty
    a1 = to_dtype(acc1, dtype).to(tl.float32)      # the projection's output, stored by the unfused layer
    a2 = to_dtype(acc2, dtype).to(tl.float32)
    rotate = head < H + HK
    if QK_NORM:
        if rotate:
            is_q = head < H
            n1 = tl.where(is_q, tl.load(qn_ptr + rd, mask=dmask, other=0.0),
                          tl.load(kn_ptr + rd, mask=dmask, other=0.0))
            n2 = tl.where(is_q, tl.load(qn_ptr + HALF + rd, mask=dmask, other=0.0),
                          tl.load(kn_ptr + HALF + rd, mask=dmask, other=0.0))
            inv_h = tl.rsqrt((row_sum(a1 * a1, 1) + row_sum(a2 * a2, 1)) / D + eps)
            a1 = to_dtype(n1.to(tl.float32)[None, :] * to_dtype(a1 * inv_h[:, None], dtype).to(tl.float32), dtype)
            a2 = to_dtype(n2.to(tl.float32)[None, :] * to_dtype(a2 * inv_h[:, None], dtype).to(tl.float32), dtype)
            a1 = a1.to(tl.float32)
            a2 = a2.to(tl.float32)
    if rotate:
        pos = tl.load(pos_ptr + rb, mask=bmask, other=0).to(tl.int64)
        cs = cs_ptr + pos[:, None] * stride_cs + rd[None, :]
        cmask = bmask[:, None] & dmask[None, :]
        cos = tl.load(cs, mask=cmask, other=0.0)
        sin = tl.load(cs + HALF, mask=cmask, other=0.0)
        o1 = to_dtype(a1 * cos - a2 * sin, dtype)
        o2 = to_dtype(a2 * cos + a1 * sin, dtype)
    else:
        o1 = to_dtype(a1, dtype)
        o2 = to_dtype(a2, dtype)
    if head < H:
        dst = q_ptr + rb[:, None].to(tl.int64) * (H * D) + head * D + rd[None, :]
        smask = bmask[:, None] & dmask[None, :]
    else:
        slot = tl.load(slot_ptr + rb, mask=bmask, other=-1)
        kv = head - H
        cache = kc_ptr
        if head >= H + HK:
            kv = head - H - HK
            cache = vc_ptr
        # caches [num_blocks, block_size, HK, D] contiguous: slot = block * block_size + offset is the row index
        dst = cache + slot[:, None].to(tl.int64) * (HK * D) + kv * D + rd[None, :]
        smask = (bmask & (slot >= 0))[:, None] & dmask[None, :]
    tl.store(dst, o1, mask=smask)
    tl.store(dst + HALF, o2, mask=smask)


@triton.jit
def _gemv_residual_kernel(x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, B, N, K,
                          HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
                          BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    bmask, nmask = rb < B, rn < N
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    if USE_PDL:
        gdc_wait()
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        x = tl.load(x_ptr + rb[:, None].to(tl.int64) * K + k[None, :], mask=bmask[:, None] & (k < K)[None, :],
                    other=0.0)
        acc = _mac(x, _weight_tile(w_ptr, rn, nmask, k, K), acc, DOT_PREC)
    if USE_PDL:
        gdc_launch_dependents()
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    dtype = y_ptr.dtype.element_ty
    offs = rb[:, None].to(tl.int64) * N + rn[None, :]
    mask = bmask[:, None] & nmask[None, :]
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # the projection rounded (its stored output), then the residual add of the norm that follows it, rounded
    tl.store(y_ptr + offs, to_dtype(to_dtype(acc, dtype).to(tl.float32) + r, dtype), mask=mask)


@triton.jit
def _gate_up_kernel(r_ptr, p_ptr, nw_ptr, w_ptr, b_ptr, y_ptr, ro_ptr, G, B, F, K, eps,
                    HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    """Program (batch tile, F tile): gate rows rn and up rows F + rn of the merged [2F, K] weight, of
    RMSNorm(residual + sum_g partials[g]). Every program needs the whole normed rows, so each forms residual' itself
    from the G partials (both passes of the norm: 2 G K fp32 reads per row, from L2 after the first program; the
    1B layer at B = 1: 14 x 896 x 4 B x 2 = 100 KB per program against its 32 x 2 rows x 896 x 2 B = 115 KB bf16
    weight tile from HBM, a cost a device profile weighs against the launch it saves); the first F tile's programs
    store it."""
    rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    bmask, nmask = rb < B, rn < F
    if USE_PDL:
        gdc_wait()
    acc_g, acc_u = _normed_gemv_pair(r_ptr, p_ptr, G, B, ro_ptr, tl.program_id(1) == 0, nw_ptr, w_ptr, rb, bmask,
                                     rn, F + rn, nmask, K, eps, True, DOT_PREC, BLOCK_B, BLOCK_K)
    if USE_PDL:
        gdc_launch_dependents()
    if HAS_BIAS:
        acc_g += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(b_ptr + F + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    dtype = y_ptr.dtype.element_ty
    g = to_dtype(acc_g, dtype).to(tl.float32)
    u = to_dtype(acc_u, dtype).to(tl.float32)
    e = tl.exp(-tl.abs(g))  # silu = g * sigmoid(g), without overflowing exp for large |g|
    s = to_dtype(g * tl.where(g >= 0, 1.0 / (1.0 + e), e / (1.0 + e)), dtype).to(tl.float32)  # rounded as F.silu's
    tl.store(y_ptr + rb[:, None].to(tl.int64) * F + rn[None, :], to_dtype(s * u, dtype),
             mask=bmask[:, None] & nmask[None, :])


@triton.jit
def _attention_o_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, sl_ptr, w_ptr, b_ptr, p_ptr, qk_scale,
                        B, H, HK, C, max_blocks, c_per_split, stride_qb, stride_btb,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr, USE_PDL: tl.constexpr):
    """Program (token b, query head h, output split s): the head's attention over its sequence's paged KV (online
    softmax in the base-2 domain, as kernels/paged_attention.py, one query row so the products are row sums, not
    dots), its output rounded to q's dtype (what the default layer stores), then the GEMV with o_weight's columns
    [h D, (h + 1) D) for outputs [s c_per_split, (s + 1) c_per_split): partials[h, b, those outputs] in fp32, the
    bias added by head 0 only. Caches [num_blocks, block_size, HK, D] contiguous (ops/checks.py)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    kvh = h // (H // HK)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    offs_n = tl.arange(0, BLOCK_N)
    if USE_PDL:
        gdc_wait()
    seq_len = tl.load(sl_ptr + b)
    q = dot_operand(tl.load(q_ptr + b.to(tl.int64) * stride_qb + h * D + offs_d, mask=dmask, other=0.0)).to(tl.float32)
    m_i = tl.full([1], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    for start in range(0, seq_len, BLOCK_N):
        toks = start + offs_n
        nmask = toks < seq_len
        blk = tl.load(bt_row + toks // BLOCK_SIZE, mask=nmask & (toks // BLOCK_SIZE < max_blocks), other=0)
        row = (blk.to(tl.int64) * BLOCK_SIZE + toks % BLOCK_SIZE) * HK + kvh
        kvmask = nmask[:, None] & dmask[None, :]
        k = tl.load(kc_ptr + row[:, None] * D + offs_d[None, :], mask=kvmask, other=0.0)
        sc = row_sum(q[None, :] * dot_operand(k).to(tl.float32), 1) * qk_scale
        sc = tl.where(nmask, sc, float("-inf"))  # masked slots may hold NaN: their loads are 0, their scores -inf
        m_new = tl.maximum(m_i, row_max(sc, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new)
        l_i = l_i * alpha + row_sum(p, 0)
        v = tl.load(vc_ptr + row[:, None] * D + offs_d[None, :], mask=kvmask, other=0.0)
        # p rounded to the cache dtype before the PV product, as kernels/paged_attention.py feeds its dot
        pv = dot_operand(to_dtype(p, v.dtype)).to(tl.float32)[:, None] * dot_operand(v).to(tl.float32)
        acc = acc * alpha + row_sum(pv, 0)
        m_i = m_new
    if USE_PDL:
        gdc_launch_dependents()
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # an empty sequence attends to nothing: output 0
    o = to_dtype(acc / l_i, q_ptr.dtype.element_ty).to(tl.float32)
    rc = tl.arange(0, BLOCK_C)
    c_lo = sp * c_per_split
    c_hi = tl.minimum(c_lo + c_per_split, C)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        c = c0 + rc
        cmask = c < c_hi
        # o_weight [C, H D] row-major: head h's D columns of output c are contiguous
        w = tl.load(w_ptr + c[None, :].to(tl.int64) * (H * D) + h * D + offs_d[:, None],
                    mask=dmask[:, None] & cmask[None, :], other=0.0)
        part = row_sum(o[:, None] * dot_operand(w).to(tl.float32), 0)
        if HAS_BIAS:
            part += tl.load(b_ptr + c, mask=cmask & (h == 0), other=0.0).to(tl.float32)
        tl.store(p_ptr + (h * B + b).to(tl.int64) * C + c, part, mask=cmask)


def _dummy(x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    return x if t is None else t


def _pdl(x: torch.Tensor) -> dict:
    """The launch's PDL arguments: on when asked for, on a CUDA device of compute capability 9 or later."""
    on = PDL and not INTERPRET and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9
    return {"USE_PDL": on, **({"launch_pdl": True} if on else {})}


def decode_qkv(x, norm_weight, eps, qkv_weight, qkv_bias, q_norm_weight, k_norm_weight, positions, cos_sin,
               k_cache, v_cache, slot_mapping):
    """The op contract (ops/ref.py decode_qkv_ref; arguments checked by ops/checks.py): q [B, H, D]."""
    b, c = x.shape
    hk, d = k_cache.shape[2], k_cache.shape[3]
    h = qkv_weight.shape[0] // d - 2 * hk
    q = torch.empty(b, h, d, device=x.device, dtype=x.dtype)
    half = d // 2
    bb = _block_b(b)
    # q/k norm reads whole heads; else heads are split into runs of _HEAD_BLOCK rotary pairs (more programs: 1B's
    # 18 heads of 64 are 36)
    bh = max(16, next_pow2(half)) if q_norm_weight is not None else min(_HEAD_BLOCK, max(16, next_pow2(half)))
    grid = (triton.cdiv(b, bb), (h + 2 * hk) * triton.cdiv(half, bh))
    _qkv_kernel[grid](x, norm_weight, qkv_weight, _dummy(x, qkv_bias), _dummy(x, q_norm_weight),
                      _dummy(x, k_norm_weight), positions, cos_sin, slot_mapping, q, k_cache, v_cache,
                      b, c, h, hk, float(eps), cos_sin.stride(0),
                      D=d, HALF=half, HAS_BIAS=qkv_bias is not None, QK_NORM=q_norm_weight is not None,
                      DOT_PREC=_dot_prec(x), BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=_block_k(c, bb, bh), **_pdl(x))
    return q


def decode_gemv_residual(x, weight, bias, residual):
    b, k = x.shape
    n = weight.shape[0]
    y = torch.empty(b, n, device=x.device, dtype=x.dtype)
    bb, bn = _block_b(b), _block_n(n)
    grid = (triton.cdiv(b, bb), triton.cdiv(n, bn))
    _gemv_residual_kernel[grid](x, weight, _dummy(x, bias), residual, y, b, n, k, HAS_BIAS=bias is not None,
                                DOT_PREC=_dot_prec(x), BLOCK_B=bb, BLOCK_N=bn, BLOCK_K=_block_k(k, bb, bn),
                                **_pdl(x))
    return y


def decode_attention_o(q, k_cache, v_cache, block_tables, seq_lens, scale, o_weight, o_bias):
    """The op contract (ops/ref.py decode_attention_o_ref): partials [H, B, C] fp32, one per query head."""
    b, h, d = q.shape
    hk, block_size = k_cache.shape[2], k_cache.shape[1]
    c = o_weight.shape[0]
    partials = torch.empty(h, b, c, device=q.device, dtype=torch.float32)
    block_d = max(16, next_pow2(d))
    block_c, splits, c_per_split = _attention_o_split(b, h, c, block_d)
    # paged_attention's token steps: p is rounded to the cache dtype relative to the running max, which moves once a
    # step, so with the same steps a sequence inside paged attention's first split (256 tokens) gets the same rounded
    # p and bf16 tokens stay equal to the default path's (random:tiny, batch 8, Triton under the interpreter: 72 of
    # 72 tokens equal with p rounded, 61 of 72 without)
    block_n = token_step(block_size)
    # a [64, 128] K or V tile is 8K fp32 elements: 8 warps keep it at 32 registers a thread
    warps = {"num_warps": 8} if block_n * block_d >= 8192 and not INTERPRET else {}
    _attention_o_kernel[(b, h, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, o_weight, _dummy(q, o_bias), partials,
        float(scale) * LOG2E, b, h, hk, c, block_tables.shape[1], c_per_split, q.stride(0), block_tables.stride(0),
        D=d, BLOCK_D=block_d, BLOCK_SIZE=block_size, BLOCK_N=block_n, BLOCK_C=block_c,
        HAS_BIAS=o_bias is not None, **warps, **_pdl(q))
    return partials


def decode_gate_up(partials, residual, norm_weight, eps, weight, bias):
    """The op contract (ops/ref.py decode_gate_up_ref): (h [B, F], residual' [B, C])."""
    b, k = residual.shape
    f = weight.shape[0] // 2
    y = torch.empty(b, f, device=residual.device, dtype=residual.dtype)
    res_out = torch.empty_like(residual)
    bb, bn = _block_b(b), _block_n(f)
    grid = (triton.cdiv(b, bb), triton.cdiv(f, bn))
    _gate_up_kernel[grid](residual, partials, norm_weight, weight, _dummy(residual, bias), y, res_out,
                          partials.shape[0], b, f, k, float(eps), HAS_BIAS=bias is not None,
                          DOT_PREC=_dot_prec(residual), BLOCK_B=bb, BLOCK_N=bn, BLOCK_K=_block_k(k, bb, bn),
                          **_pdl(residual))
    return y, res_out
