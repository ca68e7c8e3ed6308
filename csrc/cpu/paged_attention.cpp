// Decode attention over a paged KV cache on the CPU: one OpenMP task per (sequence, query head). Token t of
// sequence b lives in block block_tables[b, t / block_size] at offset t % block_size; rows past seq_lens[b] are
// never read, so stale or non-finite cache contents cannot leak in.
#include "attention.h"

namespace ive::cpu {

namespace {
template <typename T>
void attention(T* out, const T* q, const T* k_cache, const T* v_cache, const int32_t* tables, const int32_t* lens,
               int64_t batch, int64_t heads, int64_t kv_heads, int64_t d, int64_t q_stride, int64_t block_size,
               int64_t max_blocks, float scale) {
  const int64_t group = heads / kv_heads, row = kv_heads * d;
#pragma omp parallel if (batch * heads * max_blocks * block_size * d >= kParallelMin)
  {
    std::vector<float> qf, scores, acc;
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t h = 0; h < heads; ++h) {
        const int32_t* table = tables + b * max_blocks;
        const int64_t kh = h / group;
        auto rows = [&](int64_t t) {
          int64_t slot = int64_t(table[t / block_size]) * block_size + t % block_size;
          return std::pair{k_cache + slot * row + kh * d, v_cache + slot * row + kh * d};
        };
        attend_row(out + (b * heads + h) * d, q + b * q_stride + h * d, lens[b], d, scale, rows, qf, scores, acc);
      }
  }
}
}  // namespace

void paged_attention(ptr out, ptr q, ptr k_cache, ptr v_cache, ptr block_tables, ptr seq_lens, int64_t batch,
                     int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t q_stride, int64_t block_size,
                     int64_t max_blocks, double scale, int dtype) {
  const char* op = "paged_attention";
  check_dtype(dtype, op);
  IVE_CHECK(batch >= 0 && heads > 0 && kv_heads > 0 && head_dim > 0 && block_size > 0, op, "sizes must be positive");
  IVE_CHECK(heads % kv_heads == 0, op, "query heads must be a multiple of KV heads");
  for (auto [p, name] : {std::pair{out, "out"}, {q, "q"}, {k_cache, "k_cache"}, {v_cache, "v_cache"},
                         {block_tables, "block_tables"}, {seq_lens, "seq_lens"}})
    check_ptr(p, op, name);
  const int32_t* lens = as<const int32_t>(seq_lens);
  for (int64_t b = 0; b < batch; ++b)  // host memory: the bound can be checked for free
    IVE_CHECK(lens[b] >= 0 && lens[b] <= max_blocks * block_size, op, "seq_lens exceed the block table's capacity");
  IVE_CPU_DISPATCH(dtype, attention(as<scalar_t>(out), as<const scalar_t>(q), as<const scalar_t>(k_cache),
                                    as<const scalar_t>(v_cache), as<const int32_t>(block_tables), lens, batch,
                                    heads, kv_heads, head_dim, q_stride, block_size, max_blocks, float(scale)));
}

}  // namespace ive::cpu
