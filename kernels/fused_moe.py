"""Routed SwiGLU experts (fused_moe): y[t] = sum_j w[t, j] * down_e(silu(gate_e x[t]) * up_e x[t]), e = ids[t, j].

Three steps, none of which reads a device value on the host (so the op is CUDA-graph safe):
1. align (torch ops): the T*k token-slots (slot s = t * k + j) are sorted by expert, stably, and each expert's run is
   padded to a multiple of BLOCK_M, so every BLOCK_M-row block of the sorted list belongs to one expert. The padded
   length is at most T*k + min(E, T*k) * (BLOCK_M - 1) (only experts with slots pad), a bound known from shapes
   alone: the grid covers it, and blocks past the real padded length (block_expert == E) exit at once. Padding
   rows hold slot T*k, which every load and store masks out. Ids outside [0, E) get no row: their slots contribute
   nothing (nothing is read out of bounds; the host-side backends raise on them instead, without a sync to spare
   here).
2. _gate_up_kernel: one grouped GEMM, a program per (block, BLOCK_N columns of F): the block's token rows of x
   gathered, times its expert's gate rows and up rows (two fp32 accumulators over the same x tile), then
   silu(gate) * up written to the [T*k, F] intermediate at the slots' rows, in x's dtype (the operand dtype of the
   next dot: tensor cores for bf16 / fp16).
3. _down_kernel: the second grouped GEMM over F, the fp32 result scaled by the slot's routing weight and written to
   fp32 partials [T, k, Hd]; _sum_k_kernel sums them over k in j order (the oracle's) and rounds once to x's dtype.
   Partials rather than atomics: the result is the same from run to run (atomics add in arrival order), at the cost
   of T*k*Hd*4 bytes written and read once: 64 KiB at decode at the 30B-A3B shape, against the 75 MB of bf16
   weights of its 8 experts. (Across batch sizes a token's result may still change in the last bits: block_m()
   and the tuned config depend on the batch.)

At batch 1 the grid has k real blocks, one per routed expert: only those k experts' weights are read.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._tuning import INTERPRET, autotune, dot_operand, to_dtype

# configs[0] is the interpreter's: few, large programs. The rest are for the autotuner on a GPU (key: the GEMM's
# N and K and the block height the alignment chose).
_CONFIGS = [triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4)]


@triton.jit
def _load_operand(ptrs, mask, DOT_F32: tl.constexpr):
    v = tl.load(ptrs, mask=mask, other=0.0)
    if DOT_F32:  # fp32 x, or the interpreter (whose bf16 dot multiplies raw bits: _tuning.py)
        v = dot_operand(v).to(tl.float32)
    return v


@triton.jit
def _expert_block(block_expert_ptr, slots_ptr, S, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A program's (expert, slots [BLOCK_M], which slots are real, output columns [BLOCK_N], which are < N); the
    expert is E past the padded length (the caller exits: the slots read there are padding, in bounds)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    slot = tl.load(slots_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return tl.load(block_expert_ptr + pid_m), slot, slot < S, rn, rn < N


@autotune(configs=_CONFIGS, key=["N", "K", "BLOCK_M"])
@triton.jit
def _gate_up_kernel(x_ptr, w13_ptr, inter_ptr, slots_ptr, block_expert_ptr, S, TOPK, N, K, E,
                    DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """N = F (expert width), K = Hd; inter[s, n] = silu(x[t] . gate_e[n]) * (x[t] . up_e[n]), t = s // TOPK."""
    e, slot, valid, rn, n_mask = _expert_block(block_expert_ptr, slots_ptr, S, N, BLOCK_M, BLOCK_N)
    if e >= E:
        return
    token = (slot // TOPK).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    gate_rows = w13_ptr + e.to(tl.int64) * 2 * N * K + rn[None, :].to(tl.int64) * K
    up_rows = gate_rows + N * K
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_mask = k < K
        a = _load_operand(x_ptr + token[:, None] * K + k[None, :], valid[:, None] & k_mask[None, :], DOT_F32)
        w_mask = k_mask[:, None] & n_mask[None, :]
        gate = tl.dot(a, _load_operand(gate_rows + k[:, None], w_mask, DOT_F32), gate, input_precision=DOT_PREC)
        up = tl.dot(a, _load_operand(up_rows + k[:, None], w_mask, DOT_F32), up, input_precision=DOT_PREC)
    h = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(inter_ptr + slot[:, None].to(tl.int64) * N + rn[None, :], to_dtype(h, inter_ptr.dtype.element_ty),
             mask=valid[:, None] & n_mask[None, :])


@autotune(configs=_CONFIGS, key=["N", "K", "BLOCK_M"])
@triton.jit
def _down_kernel(inter_ptr, w2_ptr, tw_ptr, part_ptr, slots_ptr, block_expert_ptr, S, N, K, E,
                 DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """N = Hd, K = F; part[s, n] = tw[s] * (inter[s] . down_e[n])."""
    e, slot, valid, rn, n_mask = _expert_block(block_expert_ptr, slots_ptr, S, N, BLOCK_M, BLOCK_N)
    if e >= E:
        return
    rows = slot.to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    w_rows = w2_ptr + e.to(tl.int64) * N * K + rn[None, :].to(tl.int64) * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_mask = k < K
        a = _load_operand(inter_ptr + rows[:, None] * K + k[None, :], valid[:, None] & k_mask[None, :], DOT_F32)
        w = _load_operand(w_rows + k[:, None], k_mask[:, None] & n_mask[None, :], DOT_F32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PREC)
    acc = acc * tl.load(tw_ptr + rows, mask=valid, other=0.0)[:, None]
    tl.store(part_ptr + rows[:, None] * N + rn[None, :], acc, mask=valid[:, None] & n_mask[None, :])


@triton.jit
def _sum_k_kernel(part_ptr, y_ptr, TOPK, N, BLOCK_N: tl.constexpr):
    """y[t, n] = sum_j part[t, j, n] in j order (the oracle's), rounded once to y's dtype."""
    t, pid_n = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = rn < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in range(0, TOPK):
        acc += tl.load(part_ptr + (t * TOPK + j).to(tl.int64) * N + rn, mask=mask, other=0.0)
    tl.store(y_ptr + t.to(tl.int64) * N + rn, to_dtype(acc, y_ptr.dtype.element_ty), mask=mask)


def block_m(slots: int, experts: int) -> int:
    """Rows per block: 16 (tl.dot's minimum) while the average expert gets fewer than 32 slots (decode, small
    batches: padding would waste weight-read bandwidth on empty rows), 64 beyond (prefill: each weight tile is
    reused over more rows)."""
    return 16 if slots < 32 * experts else 64


def align(topk_ids: torch.Tensor, experts: int, bm: int):
    """(slots, block_expert): slots [blocks * bm] int32, the slot indices sorted by expert with each expert's run
    padded to a multiple of bm (padding and unused rows hold T*k); block_expert [blocks] int64, each block's expert
    (E past the padded length). Torch ops only, no host sync; blocks is a function of the shapes alone."""
    dev = topk_ids.device
    s = topk_ids.numel()
    flat = topk_ids.reshape(-1).long()
    eid = torch.where((flat >= 0) & (flat < experts), flat, experts)    # out-of-range ids: bucket E, no row
    counts = torch.zeros(experts + 1, dtype=torch.int64, device=dev).scatter_add_(0, eid, torch.ones_like(eid))
    padded = (counts + bm - 1) // bm * bm
    padded[experts] = 0
    ends = torch.cumsum(padded, 0)                                      # padded run of e: [ends[e] - padded[e], ends[e])
    starts = torch.cumsum(counts, 0) - counts                           # run of e in the sorted slots
    sorted_e, order = torch.sort(eid, stable=True)
    blocks = triton.cdiv(s + min(experts, s) * (bm - 1), bm)
    rank = torch.arange(s, device=dev) - starts[sorted_e]
    dest = torch.where(sorted_e < experts, ends[sorted_e] - padded[sorted_e] + rank, blocks * bm)
    slots = torch.full((blocks * bm + 1,), s, dtype=torch.int32, device=dev)
    slots.scatter_(0, dest, order.to(torch.int32))                      # dest is unique but for the dropped slots' dump
    block_expert = torch.searchsorted(ends[:experts], torch.arange(blocks, device=dev) * bm, right=True)
    return slots[:-1], block_expert


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """x [T, Hd] -> y [T, Hd] in x's dtype (the op contract; checks ran before)."""
    t, hd = x.shape
    e, f = w2.shape[0], w2.shape[2]
    k = topk_ids.shape[1]
    s = t * k
    if t == 0:
        return torch.empty_like(x)
    bm = block_m(s, e)
    slots, block_expert = align(topk_ids, e, bm)
    blocks = block_expert.shape[0]
    inter = torch.empty(s, f, dtype=x.dtype, device=x.device)
    part = torch.zeros(s, hd, dtype=torch.float32, device=x.device)   # dropped slots (bad ids) add zero
    dot_f32 = INTERPRET or x.dtype == torch.float32
    prec = "ieee" if dot_f32 else None
    _gate_up_kernel[lambda meta: (blocks, triton.cdiv(f, meta["BLOCK_N"]))](
        x, w13, inter, slots, block_expert, s, k, f, hd, e, DOT_F32=dot_f32, DOT_PREC=prec, BLOCK_M=bm)
    _down_kernel[lambda meta: (blocks, triton.cdiv(hd, meta["BLOCK_N"]))](
        inter, w2, topk_weights, part, slots, block_expert, s, hd, f, e, DOT_F32=dot_f32, DOT_PREC=prec, BLOCK_M=bm)
    y = torch.empty_like(x)
    block_n = min(triton.next_power_of_2(hd), 4096 if INTERPRET else 1024)
    _sum_k_kernel[(t, triton.cdiv(hd, block_n))](part, y, k, hd, BLOCK_N=block_n)
    return y
