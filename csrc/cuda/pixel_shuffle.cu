// pixel_shuffle: [n, side*side, c] -> [n, (side/f)^2, c*f*f], a pure permuting copy:
//   out[b, i*(side/f) + j, (di*f + dj)*c + ch] = in[b, (i*f + di)*side + (j*f + dj), ch]
// The copy is dtype-agnostic: it moves units U of 16, 8, 4 or 2 bytes, the widest that divides a channel row
// (c * sizeof(T) bytes) and both base addresses. One thread per output unit, grid-stride loop.
#include "common.cuh"

namespace {

using ive::ptr;

template <typename U>
__global__ void pixel_shuffle_kernel(U* __restrict__ out, const U* __restrict__ in, int64_t total, int64_t cu,
                                     int64_t side, int64_t f) {
  const int64_t s2 = side / f;  // output grid side
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < total;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // o = ((((b * s2 + i) * s2 + j) * f + di) * f + dj) * cu + ch
    int64_t r = o;
    const int64_t ch = r % cu; r /= cu;
    const int64_t dj = r % f;  r /= f;
    const int64_t di = r % f;  r /= f;
    const int64_t j = r % s2;  r /= s2;
    const int64_t i = r % s2;
    const int64_t b = r / s2;
    const int64_t src = ((b * side + (i * f + di)) * side + (j * f + dj)) * cu + ch;
    out[o] = in[src];
  }
}

template <typename U>
void launch(ptr out, ptr in, int64_t total_bytes, int64_t row_bytes, int64_t side, int64_t f, cudaStream_t s) {
  const int64_t total = total_bytes / static_cast<int64_t>(sizeof(U));
  const int64_t cu = row_bytes / static_cast<int64_t>(sizeof(U));
  constexpr int threads = 256;
  pixel_shuffle_kernel<U><<<ive::grid_for(total, threads), threads, 0, s>>>(
      reinterpret_cast<U*>(out), reinterpret_cast<const U*>(in), total, cu, side, f);
}

}  // namespace

namespace ive {
namespace cuda {

void pixel_shuffle(ptr out, ptr in, int64_t n, int64_t side, int64_t channels, int64_t factor, int dtype,
                   stream_t stream) {
  const char* op = "pixel_shuffle";
  check_dtype(dtype, op);
  IVE_CHECK(n >= 0, op, "n must be >= 0");
  IVE_CHECK(side > 0, op, "side must be > 0");
  IVE_CHECK(channels > 0, op, "channels must be > 0");
  IVE_CHECK(factor > 0, op, "factor must be > 0");
  IVE_CHECK(side % factor == 0, op, "side must be a multiple of factor");
  if (n == 0) return;
  check_ptrs(op, {{"out", out}, {"in", in}});
  const int64_t es = dtype == kF32 ? 4 : 2;
  const int64_t row_bytes = channels * es;
  const int64_t total_bytes = n * side * side * row_bytes;
  cudaStream_t s = to_stream(stream);
  // total_bytes is a multiple of row_bytes, so the unit dividing row_bytes divides it too
  with_copy_unit(op, row_bytes, out | in, [&](auto unit) {
    launch<decltype(unit)>(out, in, total_bytes, row_bytes, side, factor, s);
  });
  check_launch(op);
}

}  // namespace cuda
}  // namespace ive
