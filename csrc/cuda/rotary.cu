// rotary: NeoX rotate-half RoPE in place on q [T, H, D] (token stride q_stride) and k [T, Hk, D] (k_stride).
// One thread per (token, head, i < D/2) pair, grid-stride; heads 0..H-1 are q's, H..H+Hk-1 are k's.
//   c = cos_sin[p, i], s = cos_sin[p, D/2 + i], p = positions[t]
//   x_i <- x_i*c - x_{i+D/2}*s,  x_{i+D/2} <- x_{i+D/2}*c + x_i*s   (fp32 math, one rounding)
// Each pair is read and written by exactly one thread, so in-place is safe.
#include "common.cuh"

namespace {

using ive::dev::from_float;
using ive::dev::to_float;

template <typename T>
__global__ void rotary_kernel(T* q, T* k, const int64_t* __restrict__ positions, const float* __restrict__ cos_sin,
                              int64_t tokens, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t q_stride,
                              int64_t k_stride) {
  const int64_t half = head_dim / 2;
  const int64_t all_heads = heads + kv_heads;
  const int64_t total = tokens * all_heads * half;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx % half;
    const int64_t th = idx / half;
    const int64_t h = th % all_heads;
    const int64_t t = th / all_heads;
    T* x = h < heads ? q + t * q_stride + h * head_dim : k + t * k_stride + (h - heads) * head_dim;
    const float* cs = cos_sin + positions[t] * head_dim;
    const float c = cs[i], s = cs[half + i];
    const float x1 = to_float(x[i]), x2 = to_float(x[half + i]);
    x[i] = from_float<T>(x1 * c - x2 * s);
    x[half + i] = from_float<T>(x2 * c + x1 * s);
  }
}

}  // namespace

namespace ive {
namespace cuda {

void rotary(ptr q, ptr k, ptr positions, ptr cos_sin, int64_t tokens, int64_t heads, int64_t kv_heads,
            int64_t head_dim, int64_t q_stride, int64_t k_stride, int dtype, stream_t stream) {
  const char* op = "rotary";
  check_dtype(dtype, op);
  IVE_CHECK(tokens >= 0, op, "tokens must be >= 0");
  IVE_CHECK(heads >= 0 && kv_heads >= 0, op, "head counts must be >= 0");
  IVE_CHECK(head_dim > 0 && head_dim % 2 == 0, op, "head_dim must be positive and even");
  IVE_CHECK(heads == 0 || q_stride >= heads * head_dim, op, "q_stride must be >= heads * head_dim");
  IVE_CHECK(kv_heads == 0 || k_stride >= kv_heads * head_dim, op, "k_stride must be >= kv_heads * head_dim");
  const int64_t total = tokens * (heads + kv_heads) * (head_dim / 2);
  if (total == 0) return;
  if (heads > 0) check_ptr(q, op, "q");
  if (kv_heads > 0) check_ptr(k, op, "k");
  check_ptr(positions, op, "positions");
  check_ptr(cos_sin, op, "cos_sin");
  constexpr int threads = 256;
  IVE_DISPATCH_DTYPE(dtype, float, __half, __nv_bfloat16, {
    rotary_kernel<scalar_t><<<grid_for(total, threads), threads, 0, to_stream(stream)>>>(
        as<scalar_t>(q), as<scalar_t>(k), as<const int64_t>(positions), as<const float>(cos_sin), tokens, heads,
        kv_heads, head_dim, q_stride, k_stride);
  });
  check_launch(op);
}

}  // namespace cuda
}  // namespace ive
