// rms_norm and layer_norm on the CPU, one row per OpenMP iteration. Numerics follow ops/ref.py: fp32 statistics;
// RMSNorm rounds the normalised row to the storage dtype before the weight multiply (transformers' Qwen2RMSNorm),
// LayerNorm applies weight and bias in fp32 and rounds once.
#include <vector>

#include "cpu.h"

namespace ive::cpu {

namespace {
template <typename T>
void rms_norm_rows(T* out, T* residual_out, const T* x, const T* residual, const T* w, int64_t rows, int64_t cols,
                   float eps) {
#pragma omp parallel if (rows * cols >= kParallelMin)
  {
    std::vector<float> row(cols);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x + r * cols;
      if (residual) {
        for (int64_t c = 0; c < cols; ++c) {  // the sum is rounded to the storage dtype, as torch's add would
          T s = from_float<T>(to_float(xr[c]) + to_float(residual[r * cols + c]));
          residual_out[r * cols + c] = s;
          row[c] = to_float(s);
        }
      } else {
        for (int64_t c = 0; c < cols; ++c) row[c] = to_float(xr[c]);
      }
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t c = 0; c < cols; ++c) ss += row[c] * row[c];
      float inv = 1.f / std::sqrt(ss / float(cols) + eps);
      for (int64_t c = 0; c < cols; ++c)
        out[r * cols + c] = from_float<T>(to_float(w[c]) * to_float(from_float<T>(row[c] * inv)));
    }
  }
}

template <typename T>
void layer_norm_rows(T* out, const T* x, const T* w, const T* b, int64_t rows, int64_t cols, float eps) {
#pragma omp parallel if (rows * cols >= kParallelMin)
  {
    std::vector<float> row(cols);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      float sum = 0.f, sq = 0.f;
      // `omp simd` lets the compiler reorder the sums into vector lanes (fp32 accumulation either way)
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < cols; ++c) sum += row[c] = to_float(x[r * cols + c]);
      const float mean = sum / float(cols);
#pragma omp simd reduction(+ : sq)
      for (int64_t c = 0; c < cols; ++c) sq += (row[c] - mean) * (row[c] - mean);  // two passes: no cancellation
      const float inv = 1.f / std::sqrt(sq / float(cols) + eps);
      for (int64_t c = 0; c < cols; ++c) {
        float y = (row[c] - mean) * inv * to_float(w[c]);
        out[r * cols + c] = from_float<T>(b ? y + to_float(b[c]) : y);
      }
    }
  }
}
}  // namespace

void rms_norm(ptr out, ptr residual_out, ptr x, ptr residual, ptr weight, int64_t rows, int64_t cols, double eps,
              int dtype) {
  check_norm("rms_norm", dtype, rows, cols, out, x, weight);
  IVE_CHECK((residual == 0) == (residual_out == 0), "rms_norm", "residual and residual_out come together");
  IVE_CPU_DISPATCH(dtype, rms_norm_rows(as<scalar_t>(out), as<scalar_t>(residual_out), as<const scalar_t>(x),
                                        as<const scalar_t>(residual), as<const scalar_t>(weight), rows, cols,
                                        float(eps)));
}

void layer_norm(ptr out, ptr x, ptr weight, ptr bias, int64_t rows, int64_t cols, double eps, int dtype) {
  check_norm("layer_norm", dtype, rows, cols, out, x, weight);
  IVE_CPU_DISPATCH(dtype, layer_norm_rows(as<scalar_t>(out), as<const scalar_t>(x), as<const scalar_t>(weight),
                                          as<const scalar_t>(bias), rows, cols, float(eps)));
}

}  // namespace ive::cpu
