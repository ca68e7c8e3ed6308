// One query row against a list of key/value rows: softmax(scale * q.K^T) V with fp32 accumulation. Shared by the
// CPU flash_attention (contiguous keys) and paged_attention (keys gathered through a block table).
#pragma once
#include <algorithm>
#include <limits>
#include <vector>

#include "cpu.h"

namespace ive::cpu {

// rows(j) returns the addresses of key j's K and V head rows; out is the D-long output row.
template <typename T, typename Rows>
void attend_row(T* out, const T* q, int64_t n_keys, int64_t d, float scale, Rows rows, std::vector<float>& qf,
                std::vector<float>& scores, std::vector<float>& acc) {
  if (n_keys <= 0) {
    for (int64_t i = 0; i < d; ++i) out[i] = from_float<T>(0.f);
    return;
  }
  qf.resize(d);
  scores.resize(n_keys);
  acc.assign(d, 0.f);
  for (int64_t i = 0; i < d; ++i) qf[i] = to_float(q[i]) * scale;
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n_keys; ++j) {
    const T* k = rows(j).first;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < d; ++i) s += qf[i] * to_float(k[i]);
    scores[j] = s;
    m = std::max(m, s);
  }
  float sum = 0.f;
  for (int64_t j = 0; j < n_keys; ++j) {
    float p = std::exp(scores[j] - m);
    sum += p;
    const T* v = rows(j).second;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) acc[i] += p * to_float(v[i]);
  }
  for (int64_t i = 0; i < d; ++i) out[i] = from_float<T>(acc[i] / sum);
}

}  // namespace ive::cpu
