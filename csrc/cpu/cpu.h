// CPU helpers: 16-bit float storage types with round-to-nearest-even conversion (what torch does on a cast), so
// the C++ kernels compile without compiler-specific half types.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../common.h"

namespace ive::cpu {

// Below this many elements an op runs on the calling thread: waking the OpenMP team costs more than the work
// (decode-sized norms, rotary and cache writes).
constexpr int64_t kParallelMin = 1 << 14;

struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) {
  uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_float(f16 x) {
  // IEEE binary16 -> binary32, subnormals and inf/nan included
  uint32_t sign = uint32_t(x.bits & 0x8000) << 16, exp = (x.bits >> 10) & 0x1f, man = x.bits & 0x3ff, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: value = man * 2^-24
    float f = std::ldexp(float(man), -24);
    return sign ? -f : f;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T> inline T from_float(float f);
template <> inline float from_float<float>(float f) { return f; }
template <> inline bf16 from_float<bf16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return bf16{uint16_t((u >> 16) | 0x40)};
  u += 0x7fff + ((u >> 16) & 1);  // round to nearest, ties to even
  return bf16{uint16_t(u >> 16)};
}
template <> inline f16 from_float<f16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint16_t sign = uint16_t((u >> 16) & 0x8000);
  uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return f16{uint16_t(sign | 0x7c00 | (a > 0x7f800000u ? 0x200 : 0))};  // inf / nan
  if (a >= 0x477ff000u) return f16{uint16_t(sign | 0x7c00)};  // rounds past 65504: inf
  if (a < 0x38800000u) {  // below the smallest normal (2^-14): round to a multiple of 2^-24
    float m = std::nearbyint(std::fabs(f) * 16777216.0f);  // default rounding mode: ties to even
    return f16{uint16_t(sign | uint16_t(m))};
  }
  uint32_t r = a + 0xfff + ((a >> 13) & 1) - (112u << 23);
  return f16{uint16_t(sign | (r >> 13))};
}

}  // namespace ive::cpu

#define IVE_CPU_DISPATCH(dtype, ...) IVE_DISPATCH_DTYPE(dtype, float, ::ive::cpu::f16, ::ive::cpu::bf16, __VA_ARGS__)
