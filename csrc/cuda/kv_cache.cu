// write_kv_cache: k, v [T, Hk, D] (token strides k_stride, v_stride; heads and D dense) into the dense caches
// [num_blocks, block_size, Hk, D] at row `slot` (element offset slot * Hk * D); slot < 0 skips the token.
// A dtype-agnostic copy in units U (16/8/4/2 bytes): the widest dividing the row, both strides and every address.
// One thread per unit of one token row, grid-stride.
#include "common.cuh"

namespace {

using ive::ptr;

template <typename U>
__global__ void write_kv_cache_kernel(U* __restrict__ k_cache, U* __restrict__ v_cache, const U* __restrict__ k,
                                      const U* __restrict__ v, const int64_t* __restrict__ slot_mapping,
                                      int64_t tokens, int64_t row_units, int64_t k_stride_u, int64_t v_stride_u) {
  const int64_t total = tokens * row_units;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = idx / row_units;
    const int64_t r = idx % row_units;  // offset inside the token's [Hk, D] row (heads dense)
    const int64_t slot = slot_mapping[t];
    if (slot < 0) continue;
    k_cache[slot * row_units + r] = k[t * k_stride_u + r];
    v_cache[slot * row_units + r] = v[t * v_stride_u + r];
  }
}

template <typename U>
void launch(ptr kc, ptr vc, ptr k, ptr v, ptr slots, int64_t tokens, int64_t row_bytes, int64_t ks_bytes,
            int64_t vs_bytes, cudaStream_t s) {
  constexpr int64_t us = sizeof(U);
  const int64_t row_units = row_bytes / us;
  constexpr int threads = 256;
  write_kv_cache_kernel<U><<<ive::grid_for(tokens * row_units, threads), threads, 0, s>>>(
      reinterpret_cast<U*>(kc), reinterpret_cast<U*>(vc), reinterpret_cast<const U*>(k),
      reinterpret_cast<const U*>(v), reinterpret_cast<const int64_t*>(slots), tokens, row_units, ks_bytes / us,
      vs_bytes / us);
}

}  // namespace

namespace ive {
namespace cuda {

void write_kv_cache(ptr k_cache, ptr v_cache, ptr k, ptr v, ptr slot_mapping, int64_t tokens, int64_t kv_heads,
                    int64_t head_dim, int64_t k_stride, int64_t v_stride, int64_t block_size, int dtype,
                    stream_t stream) {
  const char* op = "write_kv_cache";
  check_dtype(dtype, op);
  IVE_CHECK(tokens >= 0, op, "tokens must be >= 0");
  IVE_CHECK(kv_heads > 0, op, "kv_heads must be > 0");
  IVE_CHECK(head_dim > 0, op, "head_dim must be > 0");
  IVE_CHECK(block_size > 0, op, "block_size must be > 0");
  IVE_CHECK(k_stride >= kv_heads * head_dim, op, "k_stride must be >= kv_heads * head_dim");
  IVE_CHECK(v_stride >= kv_heads * head_dim, op, "v_stride must be >= kv_heads * head_dim");
  if (tokens == 0) return;
  check_ptrs(op, {{"k_cache", k_cache}, {"v_cache", v_cache}, {"k", k}, {"v", v}, {"slot_mapping", slot_mapping}});
  const int64_t es = dtype == kF32 ? 4 : 2;
  const int64_t row_bytes = kv_heads * head_dim * es, ks = k_stride * es, vs = v_stride * es;
  cudaStream_t s = to_stream(stream);
  with_copy_unit(op, row_bytes | ks | vs, k_cache | v_cache | k | v, [&](auto unit) {
    launch<decltype(unit)>(k_cache, v_cache, k, v, slot_mapping, tokens, row_bytes, ks, vs, s);
  });
  check_launch(op);
}

}  // namespace cuda
}  // namespace ive
