// A CPU emulator for the CUDA kernels in csrc/cuda, so that the CPU test suite can run their real source.
//
// tests/cuda_emu/build.py copies every csrc/cuda/*.cu to a .cpp that includes this header first, rewrites each
// `kernel<<<grid, block, smem, stream>>>(args)` to `emu_launch(grid, block, smem, stream, kernel, args)` and
// compiles the result with the host C++ compiler against the CUDA toolkit's headers (used for their host parts
// only: dim3/uint3/float4 from vector_types.h, __half and __nv_bfloat16 from cuda_fp16.hpp/cuda_bf16.hpp, whose
// conversions have exact host implementations).
//
// What is modelled:
//   * Every CUDA thread of a block is an OS thread (std::thread). A launch creates blockDim.x threads once and
//     they run the blocks of the grid one after another (x fastest, then y, then z), meeting at a barrier between
//     blocks; blocks never run concurrently.
//   * __syncthreads() is a std::barrier over the block's live threads, __syncwarp() a std::barrier over the warp's
//     live lanes. A thread that returns from the kernel drops out of both (arrive_and_drop), as an exited GPU
//     thread no longer counts for bar.sync. The barriers are re-created for every block.
//   * __shfl_xor_sync / __shfl_sync / __shfl_down_sync / __shfl_up_sync are real 32-lane exchanges: every lane
//     publishes its value in a per-warp slot, the warp meets at its barrier, reads its source lane, and meets again.
//   * Misuse that is undefined behaviour on a GPU aborts the process with a message: a partial mask on
//     __syncwarp or a shuffle (the emulator only implements full-warp convergence), a full-mask shuffle or
//     __syncwarp in a warp some lane of which has already exited or that has fewer than 32 threads, block shapes
//     that are not 1-D or exceed 1024 threads, grid dimensions past the hardware limits, and dynamic shared memory.
//
// What is NOT modelled:
//   * Warp-synchronous scheduling and divergence. Lanes of a warp are independent OS threads, so a kernel that
//     relies on implicit lock-step execution (no __syncwarp between a shared-memory write and another lane's read)
//     can pass here by luck of scheduling or fail spuriously; one that diverges and calls __syncthreads() from
//     different call sites is not detected (std::barrier only counts arrivals).
//   * GPU floating-point behaviour: exp2f, rsqrtf, __expf etc. are the host libm functions (correctly rounded or
//     nearly so), fmaf is a real fused multiply-add, and there is no flush-to-zero, no approximate intrinsics and
//     no --use_fast_math. Results can differ from the GPU's in the last bits, never in logic.
//   * Memory: there is one address space. Host pointers are "device" pointers, nothing distinguishes global,
//     shared and local memory, there is no coalescing, no bank conflicts, no caches (__ldg is a plain load), no
//     alignment faults for misaligned vector accesses (x86 tolerates them), and out-of-bounds accesses are only
//     caught if they hit unmapped pages (use ASan/TSan builds of this code for more).
//   * Static __shared__ arrays: `#define __shared__ static` turns them into function-local statics, i.e. one copy
//     per kernel instantiation shared by every thread of the process. This is only correct because blocks run one
//     at a time and launches are serialised (a process-wide mutex in emu_launch): every block sees the storage
//     left behind by the previous block (like real uninitialised shared memory, but deterministic: a kernel that
//     reads shared memory before writing it may pass here and fail on a GPU).
//   * Streams, events, graphs, occupancy, timing, registers/__launch_bounds__ (ignored) and the asynchronous error
//     model: a launch runs synchronously to completion on the calling thread's call, and cudaGetLastError() always
//     returns cudaSuccess (a bad launch configuration aborts instead).
#pragma once

#if defined(__CUDACC__) || defined(__CUDA_ARCH__)
#error "tests/cuda_emu/emu.h is for host compilation (g++/clang++) of CUDA sources, not for nvcc"
#endif

#include <cuda_runtime.h>  // host_defines.h: __device__/__global__ become empty annotations without __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

// ---- qualifiers ----
#undef __shared__
#define __shared__ static  // see the header comment: process-wide storage, correct because blocks run one at a time
#undef __launch_bounds__
#define __launch_bounds__(...)
#ifndef __device__
#define __device__
#endif
#ifndef __global__
#define __global__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __forceinline__
#define __forceinline__ inline __attribute__((always_inline))
#endif

// ---- error model: launches either run to completion or abort ----
#undef cudaGetLastError
#define cudaGetLastError() cudaSuccess
#define cudaPeekAtLastError() cudaSuccess
// libcudart is not linked; the only caller formats an error that cannot happen here.
#define cudaGetErrorString(e) ((void)(e), "error reported by the CUDA emulator")

namespace emu {

#define EMU_HIDDEN __attribute__((visibility("hidden")))

// The block being run (launches are serialised, so these are process-wide).
EMU_HIDDEN extern uint3 g_block_idx;
EMU_HIDDEN extern dim3 g_block_dim, g_grid_dim;
// This OS thread's CUDA thread index.
EMU_HIDDEN extern __thread uint3 t_thread_idx;

// Fails the process with a message naming the misuse (undefined behaviour on a GPU).
[[noreturn]] void fatal(const char* what);

void syncthreads();
void syncwarp(unsigned mask);
// Exchanges one 32-bit word across the calling warp: lane l receives the word published by lane src(l).
// `src` < 0 or >= 32 means "keep my own value" (used by shfl_up/down at the edges).
uint32_t shfl_word(unsigned mask, uint32_t word, int src);

// Runs `body` for every block of `grid` with blockDim.x OS threads (see the header comment).
void run_grid(dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body);

template <typename T>
inline T shfl(unsigned mask, T v, int src) {
  static_assert(sizeof(T) == 4 && std::is_trivially_copyable_v<T>, "the emulator shuffles 32-bit values only");
  uint32_t w;
  std::memcpy(&w, &v, 4);
  w = shfl_word(mask, w, src);
  std::memcpy(&v, &w, 4);
  return v;
}

inline int lane_id() { return static_cast<int>(t_thread_idx.x & 31u); }

}  // namespace emu

// ---- built-in variables ----
#define threadIdx (::emu::t_thread_idx)
#define blockIdx (::emu::g_block_idx)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)
static constexpr int warpSize = 32;

// ---- synchronisation and warp intrinsics ----
inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::syncwarp(mask); }
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  if (width != 32) emu::fatal("__shfl_xor_sync: only width 32 is emulated");
  return emu::shfl(mask, v, emu::lane_id() ^ lane_mask);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  if (width != 32) emu::fatal("__shfl_sync: only width 32 is emulated");
  return emu::shfl(mask, v, src_lane & 31);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  if (width != 32) emu::fatal("__shfl_down_sync: only width 32 is emulated");
  const int src = emu::lane_id() + static_cast<int>(delta);
  return emu::shfl(mask, v, src < 32 ? src : -1);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  if (width != 32) emu::fatal("__shfl_up_sync: only width 32 is emulated");
  return emu::shfl(mask, v, emu::lane_id() - static_cast<int>(delta));
}

// ---- device math and memory intrinsics, host versions ----
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __exp2f(float x) { return std::exp2(x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
template <typename T>
inline T __ldg(const T* p) { return *p; }

// CUDA's integer/float min and max overloads (host code gets them from <cmath>/<algorithm> only as std::).
template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

// ---- launch ----
// The rewritten form of `kernel<<<grid, block, smem, stream>>>(args...)`. The arguments are copied by value, as a
// real launch copies them into the kernel's parameter space, then converted to the kernel's parameter types.
template <typename Kernel, typename... Args>
void emu_launch(dim3 grid, dim3 block, size_t dynamic_smem, cudaStream_t /*stream*/, Kernel kernel, Args... args) {
  emu::run_grid(grid, block, dynamic_smem, [&] { kernel(args...); });
}
