// rms_norm and layer_norm: one block per row, fp32 statistics, result rounded to the storage dtype.
//
// Rows are dense [rows, cols]. With VEC every row is read in 16-byte units (host checks cols % (16/sizeof(T)) == 0
// and 16-byte aligned base addresses); otherwise element by element, so any cols works. Each thread visits the same
// indices in every pass, so a value it wrote in an earlier pass (residual_out) is visible to it in a later one, and
// in-place use (out == x, residual_out == residual) is safe: no __restrict__ on pointers that may alias.
#include "common.cuh"

namespace {

using ive::dev::Units;
using ive::dev::block_sum;
using ive::dev::from_float;
using ive::dev::round_to;

template <typename T, bool VEC>
__global__ void rms_norm_kernel(T* out, T* residual_out, const T* x, const T* residual, const T* weight,
                                int64_t cols, float eps) {
  using U = Units<T, VEC>;
  constexpr int W = U::W;
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const int64_t units = cols / W;
  const bool has_res = residual != nullptr;
  const T* xr = x + row * cols;
  const T* rr = has_res ? residual + row * cols : nullptr;
  T* ro = has_res ? residual_out + row * cols : nullptr;

  // pass 1: x (+ residual, rounded to T and stored) and the sum of squares
  float ss = 0.f;
  for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
    float a[W];
    U::load(xr + u * W, a);
    if (has_res) {
      float r[W];
      U::load(rr + u * W, r);
#pragma unroll
      for (int i = 0; i < W; ++i) a[i] = round_to<T>(a[i] + r[i]);
      U::store(ro + u * W, a);
    }
#pragma unroll
    for (int i = 0; i < W; ++i) ss += a[i] * a[i];
  }
  const float total = block_sum(ss, red);
  const float rstd = rsqrtf(total / static_cast<float>(cols) + eps);

  // pass 2: y = w * round(x * rstd), rounded again
  const T* src = has_res ? ro : xr;
  T* orow = out + row * cols;
  for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
    float a[W], w[W];
    U::load(src + u * W, a);
    U::load(weight + u * W, w);
#pragma unroll
    for (int i = 0; i < W; ++i) a[i] = w[i] * round_to<T>(a[i] * rstd);
    U::store(orow + u * W, a);
  }
}

template <typename T, bool VEC>
__global__ void layer_norm_kernel(T* out, const T* x, const T* weight, const T* bias, int64_t cols, float eps) {
  using U = Units<T, VEC>;
  constexpr int W = U::W;
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const int64_t units = cols / W;
  const T* xr = x + row * cols;
  const float inv_cols = 1.f / static_cast<float>(cols);

  float s = 0.f;
  for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
    float a[W];
    U::load(xr + u * W, a);
#pragma unroll
    for (int i = 0; i < W; ++i) s += a[i];
  }
  const float mean = block_sum(s, red) * inv_cols;

  float v = 0.f;
  for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
    float a[W];
    U::load(xr + u * W, a);
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const float c = a[i] - mean;
      v += c * c;
    }
  }
  const float var = block_sum(v, red) * inv_cols;  // biased
  const float rstd = rsqrtf(var + eps);

  T* orow = out + row * cols;
  for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
    float a[W], w[W], b[W];
    U::load(xr + u * W, a);
    U::load(weight + u * W, w);
    if (bias != nullptr) {
      U::load(bias + u * W, b);
    } else {
#pragma unroll
      for (int i = 0; i < W; ++i) b[i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < W; ++i) a[i] = (a[i] - mean) * rstd * w[i] + b[i];
    U::store(orow + u * W, a);
  }
}

// Threads per row: enough for one unit each, a multiple of 32, between 32 and 1024.
int threads_for(int64_t units) {
  int64_t t = (units + 31) / 32 * 32;
  if (t < 32) t = 32;
  if (t > 1024) t = 1024;
  return static_cast<int>(t);
}

// The argument checks both launchers share: check_norm (as the CPU launchers) and the grid limit.
void check_norm_launch(const char* op, int dtype, int64_t rows, int64_t cols, ive::ptr out, ive::ptr x,
                       ive::ptr weight) {
  ive::check_norm(op, dtype, rows, cols, out, x, weight);
  IVE_CHECK(rows <= 0x7fffffffLL, op, "rows must fit the grid (< 2^31)");
}

// Launch shape: one block per row; 16-byte units (VEC) when cols and every address (`addrs`, OR-ed) allow.
struct NormShape {
  bool vec;
  int threads;
  dim3 grid;
};
template <typename T>
NormShape norm_shape(int64_t rows, int64_t cols, ive::ptr addrs) {
  constexpr int N = ive::dev::Vec16<T>::N;
  const bool vec = cols % N == 0 && ive::dev::aligned16(addrs);
  return {vec, threads_for(vec ? cols / N : cols), dim3(static_cast<unsigned>(rows))};
}

}  // namespace

namespace ive {
namespace cuda {

void rms_norm(ptr out, ptr residual_out, ptr x, ptr residual, ptr weight, int64_t rows, int64_t cols, double eps,
              int dtype, stream_t stream) {
  const char* op = "rms_norm";
  check_norm_launch(op, dtype, rows, cols, out, x, weight);
  if (rows == 0) return;
  if (residual != 0) check_ptr(residual_out, op, "residual_out (required with residual)");
  const ptr res_out = residual != 0 ? residual_out : 0;
  IVE_DISPATCH_DTYPE(dtype, float, __half, __nv_bfloat16, {
    const NormShape sh = norm_shape<scalar_t>(rows, cols, out | x | weight | residual | res_out);
    if (sh.vec) {
      rms_norm_kernel<scalar_t, true><<<sh.grid, sh.threads, 0, to_stream(stream)>>>(
          as<scalar_t>(out), as<scalar_t>(res_out), as<const scalar_t>(x), as<const scalar_t>(residual),
          as<const scalar_t>(weight), cols, static_cast<float>(eps));
    } else {
      rms_norm_kernel<scalar_t, false><<<sh.grid, sh.threads, 0, to_stream(stream)>>>(
          as<scalar_t>(out), as<scalar_t>(res_out), as<const scalar_t>(x), as<const scalar_t>(residual),
          as<const scalar_t>(weight), cols, static_cast<float>(eps));
    }
  });
  check_launch(op);
}

void layer_norm(ptr out, ptr x, ptr weight, ptr bias, int64_t rows, int64_t cols, double eps, int dtype,
                stream_t stream) {
  const char* op = "layer_norm";
  check_norm_launch(op, dtype, rows, cols, out, x, weight);
  if (rows == 0) return;
  IVE_DISPATCH_DTYPE(dtype, float, __half, __nv_bfloat16, {
    const NormShape sh = norm_shape<scalar_t>(rows, cols, out | x | weight | bias);
    if (sh.vec) {
      layer_norm_kernel<scalar_t, true><<<sh.grid, sh.threads, 0, to_stream(stream)>>>(
          as<scalar_t>(out), as<const scalar_t>(x), as<const scalar_t>(weight), as<const scalar_t>(bias), cols,
          static_cast<float>(eps));
    } else {
      layer_norm_kernel<scalar_t, false><<<sh.grid, sh.threads, 0, to_stream(stream)>>>(
          as<scalar_t>(out), as<const scalar_t>(x), as<const scalar_t>(weight), as<const scalar_t>(bias), cols,
          static_cast<float>(eps));
    }
  });
  check_launch(op);
}

}  // namespace cuda
}  // namespace ive
