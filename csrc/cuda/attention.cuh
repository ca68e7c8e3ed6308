// The per-tile steps shared by flash_attention.cu and paged_attention.cu (CUDA cores, fp32 math).
//
// Both kernels give each warp ROWS query rows of a CTA tile and stream the keys in tiles of BN = 32, staged in shared
// memory as fp32: K transposed (Ks[d * KP + j], KP = BN + 1) and V row-major (Vs[j * D + d]); Q is pre-scaled by
// scale*log2(e) in Qs[row * D + d] (16-byte aligned). Per tile a warp runs
//   tile_scores      s[r] = q_r . k_lane (lane j scores key j)
//   softmax_update   online softmax with exp2; p goes to the warp's rows of Ps, the accumulators are rescaled
//   __syncwarp()
//   pv_accumulate    acc[r][c] += sum_j p[r][j] * V[j][lane + 32c]
// and finally normalises and stores with store_row. The accumulator of row r holds output dims lane + 32*c,
// c < DPL = ceil(D / 32). Every lane of the warp must call softmax_update (warp shuffles, full mask).
#pragma once
#include "common.cuh"

namespace ive {
namespace dev {
namespace attn {

// m = -inf, l = 0, acc = 0 for every row of the warp.
template <int ROWS, int DPL>
__device__ __forceinline__ void init_state(float (&m_i)[ROWS], float (&l_i)[ROWS], float (&acc)[ROWS][DPL]) {
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    m_i[r] = -INFINITY;
    l_i[r] = 0.f;
#pragma unroll
    for (int c = 0; c < DPL; ++c) acc[r][c] = 0.f;
  }
}

// Key j of the tile into Ks (transposed, pitch KP) and Vs (row-major).
template <int D, int KP>
__device__ __forceinline__ void stage_kv(float* Ks, float* Vs, int j, int d, float kv, float vv) {
  Ks[d * KP + j] = kv;
  Vs[j * D + d] = vv;
}

// Scores of key `lane` of the tile against the warp's rows row0 .. row0 + ROWS - 1 (Q read as float4 broadcasts).
template <int D, int ROWS, int KP>
__device__ __forceinline__ void tile_scores(const float* Qs, const float* Ks, int row0, int lane, float (&s)[ROWS]) {
#pragma unroll
  for (int r = 0; r < ROWS; ++r) s[r] = 0.f;
#pragma unroll 8
  for (int d = 0; d < D; d += 4) {
    const float k0 = Ks[(d + 0) * KP + lane], k1 = Ks[(d + 1) * KP + lane];
    const float k2 = Ks[(d + 2) * KP + lane], k3 = Ks[(d + 3) * KP + lane];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const float4 qv = *reinterpret_cast<const float4*>(&Qs[(row0 + r) * D + d]);
      s[r] = fmaf(qv.x, k0, s[r]);
      s[r] = fmaf(qv.y, k1, s[r]);
      s[r] = fmaf(qv.z, k2, s[r]);
      s[r] = fmaf(qv.w, k3, s[r]);
    }
  }
}

// Online softmax over one tile of scores s; key `lane` counts for row r where valid(r) (a callable, inlined), else
// its score is -inf. Per row: tile max by warp shuffle, p = exp2(s - m), the accumulator rescaled by
// alpha = exp2(m_old - m_new); l_i is a per-lane partial sum (alpha is warp-uniform), to be reduced with warp_sum at
// the end. A row that has seen no visible key keeps m = -inf and uses 0 as the reference, so there is no inf - inf:
// p is 0 for masked keys and alpha 0 when nothing was seen before (acc and l are 0 then).
// p of row row0 + r, key lane goes to Ps[(row0 + r) * BN + lane].
template <int ROWS, int DPL, int BN, typename Valid>
__device__ __forceinline__ void softmax_update(const float (&s)[ROWS], Valid valid, float (&m_i)[ROWS],
                                               float (&l_i)[ROWS], float (&acc)[ROWS][DPL], float* Ps, int row0,
                                               int lane) {
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const float sv = valid(r) ? s[r] : -INFINITY;
    const float m_new = fmaxf(m_i[r], warp_max(sv));
    const float m_ref = m_new == -INFINITY ? 0.f : m_new;
    const float p = exp2f(sv - m_ref);
    const float alpha = exp2f(m_i[r] - m_ref);
    l_i[r] = l_i[r] * alpha + p;
    m_i[r] = m_new;
#pragma unroll
    for (int c = 0; c < DPL; ++c) acc[r][c] *= alpha;
    Ps[(row0 + r) * BN + lane] = p;
  }
}

// acc += P V over the tile: p of the warp's rows read from Ps (16-byte aligned) as float4, V from Vs. Keys past the
// valid range must have p == 0 and V == 0. Call after a __syncwarp() that orders the softmax_update stores.
template <int D, int ROWS, int DPL, int BN>
__device__ __forceinline__ void pv_accumulate(const float* Ps, const float* Vs, int row0, int lane,
                                              float (&acc)[ROWS][DPL]) {
#pragma unroll 4
  for (int j = 0; j < BN; j += 4) {
    float4 p4[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) p4[r] = *reinterpret_cast<const float4*>(&Ps[(row0 + r) * BN + j]);
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      float vv[DPL];
#pragma unroll
      for (int c = 0; c < DPL; ++c) {
        const int d = lane + 32 * c;
        vv[c] = (D >= 32 || d < D) ? Vs[(j + jj) * D + d] : 0.f;
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const float p = jj == 0 ? p4[r].x : jj == 1 ? p4[r].y : jj == 2 ? p4[r].z : p4[r].w;
#pragma unroll
        for (int c = 0; c < DPL; ++c) acc[r][c] = fmaf(p, vv[c], acc[r][c]);
      }
    }
  }
}

// o[d] = acc * inv for the lane's dims d = lane + 32*c < D, rounded to T.
template <typename T, int D, int DPL>
__device__ __forceinline__ void store_row(T* o, const float (&acc)[DPL], float inv, int lane) {
#pragma unroll
  for (int c = 0; c < DPL; ++c) {
    const int d = lane + 32 * c;
    if (D >= 32 || d < D) o[d] = from_float<T>(acc[c] * inv);
  }
}

}  // namespace attn
}  // namespace dev
}  // namespace ive
