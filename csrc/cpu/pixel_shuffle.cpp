// pixel_shuffle on the CPU: a pure gather, out[b, i*(S/f)+j, (di*f+dj)*C + c] = in[b, (i*f+di)*S + j*f+dj, c].
#include "cpu.h"

namespace ive::cpu {

void pixel_shuffle(ptr out, ptr in, int64_t n, int64_t side, int64_t channels, int64_t factor, int dtype) {
  const char* op = "pixel_shuffle";
  check_dtype(dtype, op);
  IVE_CHECK(n >= 0 && side > 0 && channels > 0 && factor > 0, op, "sizes must be positive");
  IVE_CHECK(side % factor == 0, op, "the feature map side must be a multiple of the shuffle factor");
  check_ptr(out, op, "out");
  check_ptr(in, op, "in");
  const int64_t s = side / factor, bytes = channels * (dtype == kF32 ? 4 : 2);
  const char* src = as<const char>(in);
  char* dst = as<char>(out);
#pragma omp parallel for collapse(2) schedule(static) if (n * side * side * channels >= kParallelMin)
  for (int64_t b = 0; b < n; ++b)
    for (int64_t i = 0; i < s; ++i)
      for (int64_t j = 0; j < s; ++j)
        for (int64_t di = 0; di < factor; ++di)
          for (int64_t dj = 0; dj < factor; ++dj) {
            int64_t src_row = (b * side + i * factor + di) * side + j * factor + dj;
            int64_t dst_row = (b * s + i) * s + j;
            std::memcpy(dst + (dst_row * factor * factor + di * factor + dj) * bytes, src + src_row * bytes, bytes);
          }
}

}  // namespace ive::cpu
