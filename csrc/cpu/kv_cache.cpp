// write_kv_cache on the CPU: token t's K and V rows go to cache row slot_mapping[t] (slot = block * block_size +
// offset, so the dense [num_blocks, block_size, Hk, D] cache is addressed as [slots, Hk, D]); slot < 0 skips.
#include "cpu.h"

namespace ive::cpu {

void write_kv_cache(ptr k_cache, ptr v_cache, ptr k, ptr v, ptr slot_mapping, int64_t tokens, int64_t kv_heads,
                    int64_t head_dim, int64_t k_stride, int64_t v_stride, int64_t block_size, int dtype) {
  const char* op = "write_kv_cache";
  check_dtype(dtype, op);
  IVE_CHECK(tokens >= 0 && kv_heads > 0 && head_dim > 0 && block_size > 0, op, "sizes must be positive");
  for (auto [p, name] : {std::pair{k_cache, "k_cache"}, {v_cache, "v_cache"}, {k, "k"}, {v, "v"},
                         {slot_mapping, "slot_mapping"}})
    check_ptr(p, op, name);
  const int64_t row = kv_heads * head_dim, bytes = row * (dtype == kF32 ? 4 : 2), elem = dtype == kF32 ? 4 : 2;
  const int64_t* slots = as<const int64_t>(slot_mapping);
#pragma omp parallel for schedule(static) if (tokens * row >= kParallelMin)
  for (int64_t t = 0; t < tokens; ++t) {
    int64_t slot = slots[t];
    if (slot < 0) continue;
    std::memcpy(as<char>(k_cache) + slot * bytes, as<const char>(k) + t * k_stride * elem, bytes);
    std::memcpy(as<char>(v_cache) + slot * bytes, as<const char>(v) + t * v_stride * elem, bytes);
  }
}

}  // namespace ive::cpu
