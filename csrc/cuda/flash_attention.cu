// flash_attention: varlen packed prefill attention with online softmax (CUDA cores, fp32 math).
//
// q [Tq, H, D] (token stride q_stride), k/v [Tk, Hk, D] (k_stride, v_stride), heads and D dense; sequence b owns
// query rows cu_seqlens_q[b] .. cu_seqlens_q[b+1] and key rows cu_seqlens_k[b] .. cu_seqlens_k[b+1]. out [Tq, H, D]
// dense. GQA: head h reads KV head h / (H / Hk). Causal masks are bottom-right aligned: query i of a sequence with
// Lq queries and Lk keys sees keys j <= Lk - Lq + i.
//
// Grid (ceil(max_seqlen_q / BLOCK_M), H, batch); a CTA of NWARPS warps owns BLOCK_M = NWARPS * ROWS query rows of
// one head; warp w owns rows w*ROWS .. w*ROWS + ROWS-1 of the tile. Per KV tile of BN = 32 keys:
//   1. all threads stage K (transposed, Ks[d][j], row pitch BN+1 so both the staging stores and the reads below are
//      bank-conflict free) and V (Vs[j][d]) as fp32 in shared memory; keys past the visible range are zero.
//   2. QK^T: lane j of a warp computes the scores of key j against the warp's ROWS query rows (Q pre-scaled by
//      scale*log2(e), read from shared memory as float4 broadcasts).
//   3. online softmax per row: tile max by warp shuffle, p = exp2(s - m), the accumulators rescaled by
//      alpha = exp2(m_old - m_new); each lane keeps a partial row sum (alpha is warp-uniform), reduced at the end.
//      A row that has seen no visible key yet keeps m = -inf and uses 0 as the reference, so no inf - inf.
//   4. PV: p goes through the warp's slice of shared memory; lane owns output dims lane + 32*c.
// Causal block skipping: a CTA only loads keys up to the last key visible to its last valid row. Rows that see no
// key at all (Lk == 0, or causal with Lk - Lq + i < 0) produce zeros.
#include "common.cuh"
#include "cuda/attention.cuh"

namespace {

using ive::ptr;
using ive::dev::to_float;
using ive::dev::warp_sum;
namespace attn = ive::dev::attn;

constexpr int kWarps = 4;
constexpr int kRows = 4;                    // query rows per warp
constexpr int kBlockM = kWarps * kRows;     // query rows per CTA
constexpr int kBlockN = 32;                 // keys per tile (one per lane in QK^T)
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;

template <typename T, int D, bool CAUSAL>
__global__ void __launch_bounds__(kThreads)
flash_attention_kernel(T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ k,
                       const T* __restrict__ v, const int* __restrict__ cu_q, const int* __restrict__ cu_k,
                       int heads, int group, int64_t q_stride, int64_t k_stride, int64_t v_stride, float scale_log2) {
  constexpr int KP = kBlockN + 1;        // Ks row pitch (odd: conflict free)
  constexpr int DPL = (D + 31) / 32;     // output dims per lane
  __shared__ __align__(16) float Qs[kBlockM * D];
  __shared__ float Ks[D * KP];
  __shared__ float Vs[kBlockN * D];
  __shared__ __align__(16) float Ps[kBlockM * kBlockN];

  const int b = blockIdx.z, h = blockIdx.y, m0 = blockIdx.x * kBlockM;
  const int q_begin = cu_q[b], Lq = cu_q[b + 1] - q_begin;
  if (m0 >= Lq) return;  // uniform across the CTA, before any barrier
  const int k_begin = cu_k[b], Lk = cu_k[b + 1] - k_begin;
  const int kvh = h / group;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // keys this CTA may need: [0, kv_end)
  int kv_end = Lk;
  if (CAUSAL) {
    const int last_row = min(m0 + kBlockM, Lq) - 1;
    kv_end = max(0, min(Lk, Lk - Lq + last_row + 1));
  }

  // Q tile, pre-scaled; rows past Lq are zero (their results are never written)
  for (int idx = tid; idx < kBlockM * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    float val = 0.f;
    if (m0 + r < Lq) val = to_float(q[(int64_t)(q_begin + m0 + r) * q_stride + (int64_t)h * D + d]) * scale_log2;
    Qs[idx] = val;
  }

  float m_i[kRows], l_i[kRows], acc[kRows][DPL];
  attn::init_state(m_i, l_i, acc);

  const T* kbase = k + (int64_t)kvh * D;
  const T* vbase = v + (int64_t)kvh * D;
  const int row0 = warp * kRows;  // first tile row of this warp

  for (int n0 = 0; n0 < kv_end; n0 += kBlockN) {
    __syncthreads();  // previous tile's Ks/Vs fully read (first pass: Qs stores ordered before the reads below)
    for (int idx = tid; idx < kBlockN * D; idx += kThreads) {
      const int j = idx / D, d = idx % D;
      float kv = 0.f, vv = 0.f;
      if (n0 + j < kv_end) {
        const int64_t tok = k_begin + n0 + j;
        kv = to_float(kbase[tok * k_stride + d]);
        vv = to_float(vbase[tok * v_stride + d]);
      }
      attn::stage_kv<D, KP>(Ks, Vs, j, d, kv, vv);
    }
    __syncthreads();

    // scores of key (n0 + lane) against this warp's rows
    float s[kRows];
    attn::tile_scores<D, kRows, KP>(Qs, Ks, row0, lane, s);
    const int kj = n0 + lane;
    const auto valid = [&](int r) {
      const int qi = m0 + row0 + r;
      bool ok = qi < Lq && kj < kv_end;
      if (CAUSAL) ok = ok && kj <= Lk - Lq + qi;
      return ok;
    };
    attn::softmax_update<kRows, DPL, kBlockN>(s, valid, m_i, l_i, acc, Ps, row0, lane);
    __syncwarp();
    // acc += P V; keys past kv_end have p == 0 and V == 0
    attn::pv_accumulate<D, kRows, DPL, kBlockN>(Ps, Vs, row0, lane, acc);
    // the next iteration's leading __syncthreads orders these Ps/Vs reads before the next writes
  }

#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float l = warp_sum(l_i[r]);  // every lane, every row
    const int qi = m0 + row0 + r;
    if (qi < Lq) {
      const float inv = l > 0.f ? 1.f / l : 0.f;
      attn::store_row<T, D>(out + ((int64_t)(q_begin + qi) * heads + h) * D, acc[r], inv, lane);
    }
  }
}

template <typename T, int D>
void launch(ptr out, ptr q, ptr k, ptr v, ptr cu_q, ptr cu_k, dim3 grid, int heads, int group, int64_t q_stride,
            int64_t k_stride, int64_t v_stride, bool causal, float scale_log2, cudaStream_t s) {
  using ive::as;
  if (causal) {
    flash_attention_kernel<T, D, true><<<grid, kThreads, 0, s>>>(
        as<T>(out), as<const T>(q), as<const T>(k), as<const T>(v), as<const int>(cu_q), as<const int>(cu_k), heads,
        group, q_stride, k_stride, v_stride, scale_log2);
  } else {
    flash_attention_kernel<T, D, false><<<grid, kThreads, 0, s>>>(
        as<T>(out), as<const T>(q), as<const T>(k), as<const T>(v), as<const int>(cu_q), as<const int>(cu_k), heads,
        group, q_stride, k_stride, v_stride, scale_log2);
  }
}

}  // namespace

namespace ive {
namespace cuda {

void flash_attention(ptr out, ptr q, ptr k, ptr v, ptr cu_seqlens_q, ptr cu_seqlens_k, int64_t batch,
                     int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t heads, int64_t kv_heads, int64_t head_dim,
                     int64_t q_stride, int64_t k_stride, int64_t v_stride, bool causal, double scale, int dtype,
                     stream_t stream) {
  const char* op = "flash_attention";
  check_dtype(dtype, op);
  IVE_CHECK(batch >= 0, op, "batch must be >= 0");
  IVE_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, op, "max_seqlen_q/k must be >= 0");
  IVE_CHECK(heads > 0 && kv_heads > 0, op, "heads and kv_heads must be > 0");
  IVE_CHECK(heads % kv_heads == 0, op, "heads must be a multiple of kv_heads");
  IVE_CHECK(head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128, op,
            "head_dim must be 16, 32, 64 or 128");
  IVE_CHECK(q_stride >= heads * head_dim, op, "q_stride must be >= heads * head_dim");
  IVE_CHECK(k_stride >= kv_heads * head_dim, op, "k_stride must be >= kv_heads * head_dim");
  IVE_CHECK(v_stride >= kv_heads * head_dim, op, "v_stride must be >= kv_heads * head_dim");
  IVE_CHECK(heads <= 65535 && batch <= 65535, op, "heads and batch must be <= 65535 (grid limits)");
  IVE_CHECK(max_seqlen_q <= 0x7fffffffLL && max_seqlen_k <= 0x7fffffffLL, op, "sequence lengths must fit int32");
  if (batch == 0 || max_seqlen_q == 0) return;
  check_ptrs(op, {{"out", out}, {"q", q}, {"k", k}, {"v", v}, {"cu_seqlens_q", cu_seqlens_q},
                  {"cu_seqlens_k", cu_seqlens_k}});
  const dim3 grid(static_cast<unsigned>((max_seqlen_q + kBlockM - 1) / kBlockM), static_cast<unsigned>(heads),
                  static_cast<unsigned>(batch));
  const int group = static_cast<int>(heads / kv_heads);
  const float scale_log2 = static_cast<float>(scale) * kLog2e;
  cudaStream_t s = to_stream(stream);
  IVE_DISPATCH_DTYPE(dtype, float, __half, __nv_bfloat16, {
    switch (head_dim) {
      case 16: launch<scalar_t, 16>(out, q, k, v, cu_seqlens_q, cu_seqlens_k, grid, (int)heads, group, q_stride,
                                    k_stride, v_stride, causal, scale_log2, s); break;
      case 32: launch<scalar_t, 32>(out, q, k, v, cu_seqlens_q, cu_seqlens_k, grid, (int)heads, group, q_stride,
                                    k_stride, v_stride, causal, scale_log2, s); break;
      case 64: launch<scalar_t, 64>(out, q, k, v, cu_seqlens_q, cu_seqlens_k, grid, (int)heads, group, q_stride,
                                    k_stride, v_stride, causal, scale_log2, s); break;
      default: launch<scalar_t, 128>(out, q, k, v, cu_seqlens_q, cu_seqlens_k, grid, (int)heads, group, q_stride,
                                     k_stride, v_stride, causal, scale_log2, s); break;
    }
  });
  check_launch(op);
}

}  // namespace cuda
}  // namespace ive
