// Device-side helpers shared by the CUDA kernels: dtype conversion, warp/block reductions, launch checks.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.h"

namespace ive {
namespace dev {

constexpr unsigned kFullMask = 0xffffffffu;

// ---- storage dtype <-> fp32 ----
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Round an fp32 value to the storage dtype and back (the value a tensor of dtype T would hold).
template <typename T> __device__ __forceinline__ float round_to(float x) { return to_float(from_float<T>(x)); }

// ---- reductions: every lane of the warp must call these (full mask) ----
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Block-wide sum; blockDim.x must be a multiple of 32 (<= 1024) and every thread must call it. `red` is a shared
// buffer of >= 32 floats; it may be reused by consecutive calls (the leading barrier protects the previous reads).
// Every thread gets the total.
// block_sum and block_max: MAX selects the operation (warp_max, identity -inf; else warp_sum, identity 0).
template <bool MAX>
__device__ __forceinline__ float block_reduce(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = MAX ? warp_max(v) : warp_sum(v);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float r = lane < nwarps ? red[lane] : (MAX ? -INFINITY : 0.f);
  return MAX ? warp_max(r) : warp_sum(r);
}
__device__ __forceinline__ float block_sum(float v, float* red) { return block_reduce<false>(v, red); }
__device__ __forceinline__ float block_max(float v, float* red) { return block_reduce<true>(v, red); }

// ---- 16-byte vector access (caller guarantees 16-byte alignment) ----
template <typename T>
struct Vec16 {
  static constexpr int N = 16 / sizeof(T);
};
template <typename T>
__device__ __forceinline__ void load16(const T* p, float (&f)[Vec16<T>::N]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec16<T>::N; ++i) f[i] = to_float(e[i]);
}
template <typename T>
__device__ __forceinline__ void store16(T* p, const float (&f)[Vec16<T>::N]) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec16<T>::N; ++i) e[i] = from_float<T>(f[i]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// W consecutive elements as fp32: W = 16 / sizeof(T) with VEC (16-byte access), else 1 (scalar access).
template <typename T, bool VEC>
struct Units {
  static constexpr int W = VEC ? Vec16<T>::N : 1;
  static __device__ __forceinline__ void load(const T* p, float (&a)[W]) {
    if constexpr (VEC) load16<T>(p, a); else a[0] = to_float(*p);
  }
  static __device__ __forceinline__ void store(T* p, const float (&a)[W]) {
    if constexpr (VEC) store16<T>(p, a); else *p = from_float<T>(a[0]);
  }
};

inline bool aligned16(ptr p) { return (p & 15) == 0; }

}  // namespace dev

// Throws std::runtime_error naming the op when the preceding launch failed (no synchronisation).
inline void check_launch(const char* op) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string(op) + ": CUDA launch failed: " + cudaGetErrorString(e));
}

inline cudaStream_t to_stream(stream_t s) { return reinterpret_cast<cudaStream_t>(s); }

// For the dtype-agnostic copy kernels: calls f(U{}) with the widest copy unit U (uint4, uint2, uint32_t or uint16_t:
// 16, 8, 4 or 2 bytes) that divides `sizes` (every byte size and stride OR-ed together) and `addrs` (every base
// address OR-ed together). Throws naming `op` when the addresses are not even 2-byte aligned.
template <typename F>
inline void with_copy_unit(const char* op, int64_t sizes, ptr addrs, F&& f) {
  if (sizes % 16 == 0 && addrs % 16 == 0) {
    f(uint4{});
  } else if (sizes % 8 == 0 && addrs % 8 == 0) {
    f(uint2{});
  } else if (sizes % 4 == 0 && addrs % 4 == 0) {
    f(uint32_t{});
  } else {
    IVE_CHECK(addrs % 2 == 0, op, "addresses must be aligned to the element size");
    f(uint16_t{});
  }
}

// Grid size for a grid-stride loop over n work items with `threads` per block (capped; the loop covers the rest).
inline unsigned grid_for(int64_t n, int threads, int64_t cap = 65535LL * 8) {
  int64_t g = (n + threads - 1) / threads;
  if (g < 1) g = 1;
  if (g > cap) g = cap;
  return static_cast<unsigned>(g);
}

}  // namespace ive
