// Host image preprocessing (internvl_engine/processor/images.py): Pillow's 8-bit bicubic resize, bit for bit, and
// the tile layout + normalisation table, on OpenMP threads. Preprocessing runs on the host before any kernel and
// was the largest single part of 1-tile TTFT on the H100 (README, "Performance"); Pillow resizes on one thread.
//
// The resize is Pillow's two-pass scheme (libImaging/Resample.c, read for its arithmetic): the caller passes each
// pass's filter taps as (first input index, tap count) bounds and int32 coefficients already in Pillow's fixed point
// (images.py, bicubic_taps), so no floating point happens here and the result does not depend on the compiler. Per
// output value and channel: acc = 2^21 + sum_k in[first + k] * coeff[k] (int32), out = clamp(acc >> 22, 0, 255).
// The first pass's uint8 result feeds the second. Pillow 13 runs the vertical pass first when the height shrinks
// by more than twice what the width does, older Pillow never; the caller says which (images.py probes the installed
// Pillow once). Horizontal first covers only the input rows the vertical taps read, as in Pillow.
#include <algorithm>
#include <vector>

#include "../images.h"
#include "../common.h"

namespace ive::images {

namespace {
constexpr int kPrecisionBits = 22;  // 32 - 8 - 2: 8-bit results, two bits of headroom for the negative lobes

inline uint8_t clip8(int32_t acc) {
  return uint8_t(std::min<int32_t>(255, std::max<int32_t>(0, acc >> kPrecisionBits)));  // arithmetic shift
}

// AVX2 clones with a runtime switch (GCC target_clones): integer sums are exact in any order, so the vector
// code gives the same bytes as the scalar code, which stays for CPUs without AVX2.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define IVE_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define IVE_VECTOR_CLONES
#endif

// One output pixel's channels accumulate together, as in Pillow (one read of each input pixel per tap).
template <int C>
void horizontal_rows(uint8_t* out, const uint8_t* in, int64_t rows, int64_t in_w, int64_t out_w,
                     const int32_t* bounds, const int32_t* coeffs, int64_t ksize, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t y = 0; y < rows; ++y) {
    const uint8_t* src = in + y * in_w * C;
    uint8_t* dst = out + y * out_w * C;
    for (int64_t x = 0; x < out_w; ++x) {
      const uint8_t* s = src + int64_t(bounds[2 * x]) * C;
      const int32_t n = bounds[2 * x + 1];
      const int32_t* k = coeffs + x * ksize;
      int32_t acc[C];
      for (int c = 0; c < C; ++c) acc[c] = 1 << (kPrecisionBits - 1);
      for (int32_t t = 0; t < n; ++t)
        for (int c = 0; c < C; ++c) acc[c] += int32_t(s[t * C + c]) * k[t];
      for (int c = 0; c < C; ++c) dst[x * C + c] = clip8(acc[c]);
    }
  }
}

void horizontal(uint8_t* out, const uint8_t* in, int64_t rows, int64_t in_w, int64_t out_w, int64_t channels,
                const int32_t* bounds, const int32_t* coeffs, int64_t ksize, int threads) {
  switch (channels) {
    case 1: return horizontal_rows<1>(out, in, rows, in_w, out_w, bounds, coeffs, ksize, threads);
    case 2: return horizontal_rows<2>(out, in, rows, in_w, out_w, bounds, coeffs, ksize, threads);
    case 3: return horizontal_rows<3>(out, in, rows, in_w, out_w, bounds, coeffs, ksize, threads);
    default: return horizontal_rows<4>(out, in, rows, in_w, out_w, bounds, coeffs, ksize, threads);
  }
}

// acc[i] += row[i] * k over one input row: the vertical pass's inner loop
IVE_VECTOR_CLONES void multiply_add_row(int32_t* acc, const uint8_t* row, int32_t k, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += int32_t(row[i]) * k;
}

IVE_VECTOR_CLONES void clip_row(uint8_t* out, const int32_t* acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = clip8(acc[i]);
}

void vertical(uint8_t* out, const uint8_t* in, int64_t out_h, int64_t row_len, const int32_t* bounds,
              const int32_t* coeffs, int64_t ksize, int64_t first_row, int threads) {
#pragma omp parallel num_threads(threads)
  {
    std::vector<int32_t> acc(row_len);
#pragma omp for schedule(static)
    for (int64_t y = 0; y < out_h; ++y) {
      const uint8_t* src = in + (int64_t(bounds[2 * y]) - first_row) * row_len;
      const int32_t n = bounds[2 * y + 1];
      const int32_t* k = coeffs + y * ksize;
      std::fill(acc.begin(), acc.end(), 1 << (kPrecisionBits - 1));
      for (int32_t t = 0; t < n; ++t) multiply_add_row(acc.data(), src + t * row_len, k[t], row_len);
      clip_row(out + y * row_len, acc.data(), row_len);
    }
  }
}
}  // namespace

void resize_u8(ptr out, ptr in, int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w, int64_t channels,
               ptr h_bounds, ptr h_coeffs, int64_t h_ksize, ptr v_bounds, ptr v_coeffs, int64_t v_ksize,
               bool vertical_first, int64_t threads) {
  const char* op = "resize_u8";
  check_ptrs(op, {{"out", out}, {"in", in}});
  IVE_CHECK(in_h > 0 && in_w > 0 && out_h > 0 && out_w > 0, op, "sizes must be positive");
  IVE_CHECK(channels >= 1 && channels <= 4, op, "channels must be 1 to 4");
  IVE_CHECK(threads >= 1, op, "threads must be at least 1");
  IVE_CHECK((h_bounds == 0) == (h_coeffs == 0) && (v_bounds == 0) == (v_coeffs == 0), op,
            "bounds and coefficients come in pairs (both 0 skips a pass)");
  IVE_CHECK(h_bounds != 0 || out_w == in_w, op, "no horizontal taps but the width changes");
  IVE_CHECK(v_bounds != 0 || out_h == in_h, op, "no vertical taps but the height changes");
  const auto* src = reinterpret_cast<const uint8_t*>(in);
  auto* dst = reinterpret_cast<uint8_t*>(out);
  const auto* hb = reinterpret_cast<const int32_t*>(h_bounds);
  const auto* vb = reinterpret_cast<const int32_t*>(v_bounds);
  // every tap must stay inside the input: a wrong table is an error here, not a read past the image
  for (int64_t x = 0; hb && x < out_w; ++x)
    IVE_CHECK(hb[2 * x] >= 0 && hb[2 * x + 1] >= 0 && hb[2 * x + 1] <= h_ksize &&
                  int64_t(hb[2 * x]) + hb[2 * x + 1] <= in_w,
              op, "horizontal taps out of range");
  for (int64_t y = 0; vb && y < out_h; ++y)
    IVE_CHECK(vb[2 * y] >= 0 && vb[2 * y + 1] >= 0 && vb[2 * y + 1] <= v_ksize &&
                  int64_t(vb[2 * y]) + vb[2 * y + 1] <= in_h,
              op, "vertical taps out of range");
  const int nt = int(threads);
  if (!vb && !hb) {
    std::copy(src, src + in_h * in_w * channels, dst);
    return;
  }
  const auto* hk = reinterpret_cast<const int32_t*>(h_coeffs);
  const auto* vk = reinterpret_cast<const int32_t*>(v_coeffs);
  if (!vb) {
    horizontal(dst, src, in_h, in_w, out_w, channels, hb, hk, h_ksize, nt);
    return;
  }
  if (!hb) {
    vertical(dst, src, out_h, in_w * channels, vb, vk, v_ksize, 0, nt);
    return;
  }
  if (vertical_first) {
    std::vector<uint8_t> tmp(size_t(out_h * in_w * channels));
    vertical(tmp.data(), src, out_h, in_w * channels, vb, vk, v_ksize, 0, nt);
    horizontal(dst, tmp.data(), out_h, in_w, out_w, channels, hb, hk, h_ksize, nt);
    return;
  }
  int64_t first = in_h, last = 0;  // the input rows any vertical tap reads
  for (int64_t y = 0; y < out_h; ++y) {
    first = std::min<int64_t>(first, vb[2 * y]);
    last = std::max<int64_t>(last, int64_t(vb[2 * y]) + vb[2 * y + 1]);
  }
  last = std::max(last, first);
  const uint8_t* rows = src + first * in_w * channels;
  std::vector<uint8_t> tmp(size_t((last - first) * out_w * channels));
  horizontal(tmp.data(), rows, last - first, in_w, out_w, channels, hb, hk, h_ksize, nt);
  vertical(dst, tmp.data(), out_h, out_w * channels, vb, vk, v_ksize, first, nt);
}

void tiles_normalize(ptr out, ptr in, int64_t rows, int64_t cols, int64_t tile, int64_t channels, ptr table,
                     int64_t threads) {
  const char* op = "tiles_normalize";
  check_ptrs(op, {{"out", out}, {"in", in}, {"table", table}});
  IVE_CHECK(rows > 0 && cols > 0 && tile > 0 && channels >= 1 && channels <= 4, op, "bad grid");
  IVE_CHECK(threads >= 1, op, "threads must be at least 1");
  const auto* src = reinterpret_cast<const uint8_t*>(in);
  const auto* lut = reinterpret_cast<const float*>(table);
  auto* dst = reinterpret_cast<float*>(out);
  const int64_t width = cols * tile, n_rows = rows * cols * tile;
  // input [rows * tile, cols * tile, C] -> out [rows * cols, C, tile, tile]; one (tile, row-in-tile) per iteration
#pragma omp parallel for num_threads(int(threads)) schedule(static)
  for (int64_t job = 0; job < n_rows; ++job) {
    const int64_t t = job / tile, i = job % tile, r = t / cols, c0 = t % cols;
    const uint8_t* s = src + ((r * tile + i) * width + c0 * tile) * channels;
    for (int64_t c = 0; c < channels; ++c) {
      float* d = dst + ((t * channels + c) * tile + i) * tile;
      const float* l = lut + c * 256;
      for (int64_t j = 0; j < tile; ++j) d[j] = l[s[j * channels + c]];
    }
  }
}

}  // namespace ive::images
