// NeoX rotate-half RoPE on the CPU, in place: x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin, in fp32.
#include "cpu.h"

namespace ive::cpu {

namespace {
template <typename T>
void rotate(T* x, const int64_t* positions, const float* cos_sin, int64_t tokens, int64_t heads, int64_t d,
            int64_t stride) {
  const int64_t half = d / 2;
#pragma omp parallel for schedule(static) if (tokens * heads * d >= kParallelMin)
  for (int64_t t = 0; t < tokens; ++t) {
    const float* cs = cos_sin + positions[t] * d;
    for (int64_t h = 0; h < heads; ++h) {
      T* row = x + t * stride + h * d;
      for (int64_t i = 0; i < half; ++i) {
        float x1 = to_float(row[i]), x2 = to_float(row[i + half]), c = cs[i], s = cs[half + i];
        row[i] = from_float<T>(x1 * c - x2 * s);
        row[i + half] = from_float<T>(x2 * c + x1 * s);
      }
    }
  }
}
}  // namespace

void rotary(ptr q, ptr k, ptr positions, ptr cos_sin, int64_t tokens, int64_t heads, int64_t kv_heads,
            int64_t head_dim, int64_t q_stride, int64_t k_stride, int dtype) {
  const char* op = "rotary";
  check_dtype(dtype, op);
  IVE_CHECK(tokens >= 0 && heads > 0 && kv_heads > 0, op, "sizes must be positive");
  IVE_CHECK(head_dim > 0 && head_dim % 2 == 0, op, "head_dim must be even");
  IVE_CHECK(q_stride >= heads * head_dim && k_stride >= kv_heads * head_dim, op, "token strides overlap rows");
  for (auto [p, name] : {std::pair{q, "q"}, {k, "k"}, {positions, "positions"}, {cos_sin, "cos_sin"}})
    check_ptr(p, op, name);
  IVE_CPU_DISPATCH(dtype, {
    rotate(as<scalar_t>(q), as<const int64_t>(positions), as<const float>(cos_sin), tokens, heads, head_dim, q_stride);
    rotate(as<scalar_t>(k), as<const int64_t>(positions), as<const float>(cos_sin), tokens, kv_heads, head_dim,
           k_stride);
  });
}

}  // namespace ive::cpu
