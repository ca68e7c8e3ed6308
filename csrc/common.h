// Host-side helpers shared by the CPU and CUDA launchers: argument checks and the dtype switch.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "ops.h"

namespace ive {

// Throws std::invalid_argument (pybind11 turns it into ValueError) naming the op and the broken condition.
#define IVE_CHECK(cond, op, msg)                                                                              \
  do {                                                                                                        \
    if (!(cond)) throw std::invalid_argument(std::string(op) + ": " + (msg) + " (failed: " #cond ")");        \
  } while (0)

inline const char* dtype_name(int dtype) {
  switch (dtype) {
    case kF32: return "float32";
    case kF16: return "float16";
    case kBF16: return "bfloat16";
    default: return "unknown";
  }
}

inline void check_dtype(int dtype, const char* op) {
  IVE_CHECK(dtype == kF32 || dtype == kF16 || dtype == kBF16, op, "dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16)");
}

inline void check_ptr(ptr p, const char* op, const char* name) {
  if (p == 0) throw std::invalid_argument(std::string(op) + ": " + name + " is a null address");
}

// check_ptr for each {name, address} in order: check_ptrs(op, {{"out", out}, {"x", x}}).
struct NamedPtr {
  const char* name;
  ptr p;
};
inline void check_ptrs(const char* op, std::initializer_list<NamedPtr> ptrs) {
  for (const NamedPtr& n : ptrs) check_ptr(n.p, op, n.name);
}

// The arguments every norm launcher shares.
inline void check_norm(const char* op, int dtype, int64_t rows, int64_t cols, ptr out, ptr x, ptr weight) {
  check_dtype(dtype, op);
  IVE_CHECK(rows >= 0 && cols > 0, op, "rows must be >= 0 and cols > 0");
  check_ptr(out, op, "out");
  check_ptr(x, op, "x");
  check_ptr(weight, op, "weight");
}

template <typename T>
inline T* as(ptr p) { return reinterpret_cast<T*>(p); }

// DISPATCH_DTYPE(dtype, F32, F16, BF16, ...) runs the body with `scalar_t` bound to the storage type.
#define IVE_DISPATCH_DTYPE(dtype, F32_T, F16_T, BF16_T, ...)          \
  switch (dtype) {                                                   \
    case ::ive::kF32: { using scalar_t = F32_T; __VA_ARGS__; break; }  \
    case ::ive::kF16: { using scalar_t = F16_T; __VA_ARGS__; break; }  \
    case ::ive::kBF16: { using scalar_t = BF16_T; __VA_ARGS__; break; } \
    default: throw std::invalid_argument("unsupported dtype code " + std::to_string(dtype)); \
  }

}  // namespace ive
