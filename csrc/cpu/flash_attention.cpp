// Varlen attention on the CPU (prefill and the vision tower): one OpenMP task per (head, query row) of each
// sequence. Causal masks are aligned bottom-right: query i of a sequence with Lq queries and Lk keys sees keys
// 0 .. Lk - Lq + i. GQA: query head h reads KV head h / (H / Hk).
#include "attention.h"

namespace ive::cpu {

namespace {
template <typename T>
void attention(T* out, const T* q, const T* k, const T* v, const int32_t* cu_q, const int32_t* cu_k, int64_t batch,
               int64_t heads, int64_t kv_heads, int64_t d, int64_t q_stride, int64_t k_stride, int64_t v_stride,
               bool causal, float scale) {
  const int64_t group = heads / kv_heads;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t q0 = cu_q[b], lq = cu_q[b + 1] - q0, k0 = cu_k[b], lk = cu_k[b + 1] - k0;
#pragma omp parallel
    {
      std::vector<float> qf, scores, acc;
#pragma omp for collapse(2) schedule(dynamic, 4)
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < lq; ++i) {
          const int64_t kh = h / group, n = causal ? std::min(lk, lk - lq + i + 1) : lk;
          auto rows = [&](int64_t j) {
            return std::pair{k + (k0 + j) * k_stride + kh * d, v + (k0 + j) * v_stride + kh * d};
          };
          attend_row(out + ((q0 + i) * heads + h) * d, q + (q0 + i) * q_stride + h * d, n, d, scale, rows, qf,
                     scores, acc);
        }
    }
  }
}
}  // namespace

void flash_attention(ptr out, ptr q, ptr k, ptr v, ptr cu_seqlens_q, ptr cu_seqlens_k, int64_t batch,
                     int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t heads, int64_t kv_heads, int64_t head_dim,
                     int64_t q_stride, int64_t k_stride, int64_t v_stride, bool causal, double scale, int dtype) {
  const char* op = "flash_attention";
  check_dtype(dtype, op);
  IVE_CHECK(batch >= 0 && heads > 0 && kv_heads > 0 && head_dim > 0, op, "sizes must be positive");
  IVE_CHECK(heads % kv_heads == 0, op, "query heads must be a multiple of KV heads");
  for (auto [p, name] : {std::pair{out, "out"}, {q, "q"}, {k, "k"}, {v, "v"}, {cu_seqlens_q, "cu_seqlens_q"},
                         {cu_seqlens_k, "cu_seqlens_k"}})
    check_ptr(p, op, name);
  (void)max_seqlen_q;  // the CPU loop reads the lengths themselves; the GPU launchers size their grids with these
  (void)max_seqlen_k;
  IVE_CPU_DISPATCH(dtype, attention(as<scalar_t>(out), as<const scalar_t>(q), as<const scalar_t>(k),
                                    as<const scalar_t>(v), as<const int32_t>(cu_seqlens_q),
                                    as<const int32_t>(cu_seqlens_k), batch, heads, kv_heads, head_dim, q_stride,
                                    k_stride, v_stride, causal, float(scale)));
}

}  // namespace ive::cpu
