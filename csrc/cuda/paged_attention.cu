// paged_attention: decode attention (one query token per sequence) over the paged KV cache, split-KV optional.
//
// q [B, H, D] (token stride q_stride), caches [num_blocks, block_size, Hk, D] dense, block_tables int32
// [B, max_blocks], seq_lens int32 [B]; token t of sequence b lives in block block_tables[b*max_blocks + t/block_size]
// at offset t % block_size. out [B, H, D] dense.
//
// Grid (B, Hk * head_chunks, num_splits). A CTA owns one (sequence, KV head, split) and up to kHeads = 8 query heads
// of that KV head's GQA group (head_chunks = ceil(G / 8), so every K/V row is loaded once per CTA for G <= 8),
// kWarps warps of kRows heads each. It streams the split's tokens in tiles of 32, exactly as flash_attention.cu:
//   the 32 tokens' cache row offsets are computed once into shared memory (a token at t >= end gets -1 and is never
//   read: the block table is only read for t < seq_len, so garbage entries past the used part are never touched
//   and NaN planted in unused cache rows never enters), K is staged transposed (pitch 33) and V row-major as fp32,
//   lane j scores token j against the warp's heads (Q pre-scaled by scale*log2(e)), online softmax with exp2,
//   p through shared memory, lane owns output dims lane + 32*c.
// Splits: chunk = ceil(max_blocks*block_size / num_splits) rounded up to a multiple of kPagedSplitTokens (ops.h);
// split s covers tokens [s*chunk, min((s+1)*chunk, seq_len)). The caller passes num_splits =
// ceil(capacity / 256), so every split is the same 256-token range whatever the batch and block-table width, and
// a sequence's result does not depend on the batch it runs in (batch invariance; empty splits add exact zeros, and
// the single-split path multiplies by 1/l exactly as the merge does). With num_splits == 1 the CTA normalises and
// writes `out`. Otherwise
// it writes its unnormalised accumulator, running max m (base-2 domain, -inf for an empty split) and running sum l
// to the fp32 workspace and paged_attention_merge_kernel combines the splits:
//   workspace[0 : B*H*S*D]              acc of row (b*H + h)*S + s at row*D .. row*D + D-1
//   workspace[B*H*S*D : B*H*S*(D+2)]    (m, l) of that row at 2*row, 2*row + 1
//   M = max over splits with m > -inf, w_s = exp2(m_s - M), out = sum w_s acc_s * (1 / sum w_s l_s) (0 if no tokens).
// seq_len 0 gives zeros.
#include "common.cuh"
#include "cuda/attention.cuh"

namespace {

using ive::ptr;
using ive::dev::from_float;
using ive::dev::to_float;
using ive::dev::warp_sum;
namespace attn = ive::dev::attn;

constexpr int kWarps = 4;
constexpr int kRows = 2;                 // query heads per warp
constexpr int kHeads = kWarps * kRows;   // query heads per CTA
constexpr int kBlockN = 32;              // tokens per tile
constexpr int kThreads = kWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
paged_attention_kernel(T* __restrict__ out, float* __restrict__ ws, const T* __restrict__ q,
                       const T* __restrict__ k_cache, const T* __restrict__ v_cache,
                       const int* __restrict__ block_tables, const int* __restrict__ seq_lens, int heads,
                       int kv_heads, int group, int head_chunks, int64_t q_stride, int block_size, int max_blocks,
                       int chunk, int num_splits, float scale_log2) {
  constexpr int KP = kBlockN + 1;
  constexpr int DPL = (D + 31) / 32;
  __shared__ __align__(16) float Qs[kHeads * D];
  __shared__ float Ks[D * KP];
  __shared__ float Vs[kBlockN * D];
  __shared__ __align__(16) float Ps[kHeads * kBlockN];
  __shared__ int64_t tok_off[kBlockN];

  const int b = blockIdx.x;
  const int kvh = blockIdx.y / head_chunks;
  const int g0 = (blockIdx.y % head_chunks) * kHeads;  // first group member handled here
  const int split = blockIdx.z;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int row0 = warp * kRows;
  const int h_base = kvh * group + g0;                  // query head of tile row 0
  const int rows_here = min(kHeads, group - g0);        // valid tile rows
  const bool warp_active = row0 < rows_here;            // warp-uniform

  const int64_t capacity = (int64_t)max_blocks * block_size;
  const int64_t seq_len = min((int64_t)max(seq_lens[b], 0), capacity);
  const int64_t start = (int64_t)split * chunk;
  const int64_t end = min(seq_len, start + chunk);   // may be <= start: no tokens

  for (int idx = tid; idx < kHeads * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    float val = 0.f;
    if (r < rows_here) val = to_float(q[(int64_t)b * q_stride + (int64_t)(h_base + r) * D + d]) * scale_log2;
    Qs[idx] = val;
  }

  float m_i[kRows], l_i[kRows], acc[kRows][DPL];
  attn::init_state(m_i, l_i, acc);

  const int64_t row_elems = (int64_t)kv_heads * D;  // one cache row [Hk, D]
  const int* table = block_tables + (int64_t)b * max_blocks;

  for (int64_t n0 = start; n0 < end; n0 += kBlockN) {
    __syncthreads();  // previous tile's tok_off/Ks/Vs reads done (first pass: Qs stores ordered before reads)
    if (tid < kBlockN) {
      const int64_t t = n0 + tid;
      int64_t off = -1;
      if (t < end) {
        const int64_t blk = table[t / block_size];
        off = (blk * block_size + t % block_size) * row_elems + (int64_t)kvh * D;
      }
      tok_off[tid] = off;
    }
    __syncthreads();
    for (int idx = tid; idx < kBlockN * D; idx += kThreads) {
      const int j = idx / D, d = idx % D;
      const int64_t off = tok_off[j];
      float kv = 0.f, vv = 0.f;
      if (off >= 0) {
        kv = to_float(k_cache[off + d]);
        vv = to_float(v_cache[off + d]);
      }
      attn::stage_kv<D, KP>(Ks, Vs, j, d, kv, vv);
    }
    __syncthreads();

    if (warp_active) {  // warp-uniform: the shuffles below are reached by all 32 lanes or by none
      float s[kRows];
      attn::tile_scores<D, kRows, KP>(Qs, Ks, row0, lane, s);
      const bool tok_valid = n0 + lane < end;  // invalid rows are finite junk (zero Q), never written
      const auto valid = [tok_valid](int) { return tok_valid; };
      attn::softmax_update<kRows, DPL, kBlockN>(s, valid, m_i, l_i, acc, Ps, row0, lane);
      __syncwarp();
      attn::pv_accumulate<D, kRows, DPL, kBlockN>(Ps, Vs, row0, lane, acc);
    }
  }

  if (!warp_active) return;  // no barrier follows
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const float l = warp_sum(l_i[r]);  // all lanes of an active warp, every row
    if (row0 + r >= rows_here) continue;
    const int h = h_base + row0 + r;
    if (num_splits == 1) {
      const float inv = l > 0.f ? 1.f / l : 0.f;
      attn::store_row<T, D>(out + ((int64_t)b * heads + h) * D, acc[r], inv, lane);
    } else {
      const int64_t row = ((int64_t)b * heads + h) * num_splits + split;
      float* wo = ws + row * D;
#pragma unroll
      for (int c = 0; c < DPL; ++c) {
        const int d = lane + 32 * c;
        if (D >= 32 || d < D) wo[d] = acc[r][c];
      }
      if (lane == 0) {
        float* ml = ws + (int64_t)gridDim.x * heads * num_splits * D + 2 * row;
        ml[0] = m_i[r];
        ml[1] = l;
      }
    }
  }
}

// One block per (sequence, head); thread d owns output dim d.
template <typename T>
__global__ void paged_attention_merge_kernel(T* __restrict__ out, const float* __restrict__ ws, int64_t rows_bh,
                                             int head_dim, int num_splits) {
  const int64_t bh = blockIdx.x;  // b * H + h
  const float* wo = ws + bh * num_splits * head_dim;
  const float* ml = ws + rows_bh * num_splits * head_dim + bh * num_splits * 2;
  float M = -INFINITY;
  for (int s = 0; s < num_splits; ++s) M = fmaxf(M, ml[2 * s]);
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float num = 0.f, den = 0.f;
    if (M != -INFINITY) {
      for (int s = 0; s < num_splits; ++s) {
        const float m = ml[2 * s];
        if (m == -INFINITY) continue;  // empty split: acc 0, l 0; skipping avoids exp2(-inf - -inf)
        const float w = exp2f(m - M);
        den = fmaf(w, ml[2 * s + 1], den);
        num = fmaf(w, wo[(int64_t)s * head_dim + d], num);
      }
    }
    out[bh * head_dim + d] = from_float<T>(num * (den > 0.f ? 1.f / den : 0.f));
  }
}

template <typename T, int D>
void launch(ptr out, ptr ws, ptr q, ptr kc, ptr vc, ptr tables, ptr lens, dim3 grid, int heads, int kv_heads,
            int group, int head_chunks, int64_t q_stride, int block_size, int max_blocks, int chunk, int num_splits,
            float scale_log2, cudaStream_t s) {
  using ive::as;
  paged_attention_kernel<T, D><<<grid, kThreads, 0, s>>>(
      as<T>(out), as<float>(ws), as<const T>(q), as<const T>(kc), as<const T>(vc), as<const int>(tables),
      as<const int>(lens), heads, kv_heads, group, head_chunks, q_stride, block_size, max_blocks, chunk, num_splits,
      scale_log2);
}

}  // namespace

namespace ive {
namespace cuda {

void paged_attention(ptr out, ptr q, ptr k_cache, ptr v_cache, ptr block_tables, ptr seq_lens, int64_t batch,
                     int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t q_stride, int64_t block_size,
                     int64_t max_blocks, double scale, int dtype, ptr workspace, int64_t num_splits,
                     stream_t stream) {
  const char* op = "paged_attention";
  check_dtype(dtype, op);
  IVE_CHECK(batch >= 0, op, "batch must be >= 0");
  IVE_CHECK(heads > 0 && kv_heads > 0, op, "heads and kv_heads must be > 0");
  IVE_CHECK(heads % kv_heads == 0, op, "heads must be a multiple of kv_heads");
  IVE_CHECK(head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128, op,
            "head_dim must be 16, 32, 64 or 128");
  IVE_CHECK(q_stride >= heads * head_dim, op, "q_stride must be >= heads * head_dim");
  IVE_CHECK(block_size > 0, op, "block_size must be > 0");
  IVE_CHECK(max_blocks >= 0, op, "max_blocks must be >= 0");
  IVE_CHECK(num_splits >= 1 && num_splits <= 65535, op, "num_splits must be in [1, 65535]");
  IVE_CHECK(batch * heads <= 0x7fffffffLL, op, "batch * heads must fit the grid (< 2^31)");
  IVE_CHECK(max_blocks * block_size <= 0x7fffffffLL, op, "max_blocks * block_size must fit int32");
  if (batch == 0) return;
  check_ptrs(op, {{"out", out}, {"q", q}, {"k_cache", k_cache}, {"v_cache", v_cache}, {"block_tables", block_tables},
                  {"seq_lens", seq_lens}});
  if (num_splits > 1) check_ptr(workspace, op, "workspace (required with num_splits > 1)");

  const int64_t group = heads / kv_heads;
  const int64_t head_chunks = (group + kHeads - 1) / kHeads;
  IVE_CHECK(kv_heads * head_chunks <= 65535, op, "kv_heads * ceil(group / 8) must be <= 65535 (grid limit)");
  const int64_t capacity = max_blocks * block_size;
  int64_t chunk = (capacity + num_splits - 1) / num_splits;
  chunk = num_splits == 1 ? capacity : (chunk + kPagedSplitTokens - 1) / kPagedSplitTokens * kPagedSplitTokens;
  const dim3 grid(static_cast<unsigned>(batch), static_cast<unsigned>(kv_heads * head_chunks),
                  static_cast<unsigned>(num_splits));
  const float scale_log2 = static_cast<float>(scale) * kLog2e;
  cudaStream_t s = to_stream(stream);
  const int ns = static_cast<int>(num_splits);
  IVE_DISPATCH_DTYPE(dtype, float, __half, __nv_bfloat16, {
    switch (head_dim) {
      case 16: launch<scalar_t, 16>(out, workspace, q, k_cache, v_cache, block_tables, seq_lens, grid, (int)heads,
                                    (int)kv_heads, (int)group, (int)head_chunks, q_stride, (int)block_size,
                                    (int)max_blocks, (int)chunk, ns, scale_log2, s); break;
      case 32: launch<scalar_t, 32>(out, workspace, q, k_cache, v_cache, block_tables, seq_lens, grid, (int)heads,
                                    (int)kv_heads, (int)group, (int)head_chunks, q_stride, (int)block_size,
                                    (int)max_blocks, (int)chunk, ns, scale_log2, s); break;
      case 64: launch<scalar_t, 64>(out, workspace, q, k_cache, v_cache, block_tables, seq_lens, grid, (int)heads,
                                    (int)kv_heads, (int)group, (int)head_chunks, q_stride, (int)block_size,
                                    (int)max_blocks, (int)chunk, ns, scale_log2, s); break;
      default: launch<scalar_t, 128>(out, workspace, q, k_cache, v_cache, block_tables, seq_lens, grid, (int)heads,
                                     (int)kv_heads, (int)group, (int)head_chunks, q_stride, (int)block_size,
                                     (int)max_blocks, (int)chunk, ns, scale_log2, s); break;
    }
    check_launch(op);
    if (num_splits > 1) {
      const int threads = head_dim >= 128 ? 128 : static_cast<int>((head_dim + 31) / 32 * 32);
      paged_attention_merge_kernel<scalar_t><<<static_cast<unsigned>(batch * heads), threads, 0, s>>>(
          as<scalar_t>(out), as<const float>(workspace), batch * heads, static_cast<int>(head_dim), ns);
    }
  });
  check_launch(op);
}

}  // namespace cuda
}  // namespace ive
