// fused_moe on the CPU: routed SwiGLU experts, y[t] = sum_j w[t, j] * down_e(silu(gate_e x[t]) * up_e x[t]),
// e = ids[t, j]. The T*k token-slots (slot s = t * k + j) are grouped by expert with a counting sort (token order
// within an expert), and each expert with slots runs once on its rows: at batch 1 only the k routed experts'
// weights are read. Two parallel phases of (expert, block of weight rows) work items, dynamically scheduled:
//   1. gate/up: each item converts its block of gate rows and up rows to fp32 once and multiplies every row of the
//      expert by them; silu(gate) * up goes to an fp32 intermediate [T*k, F] (never rounded to the storage dtype).
//   2. down: each item converts its block of down rows, multiplies the expert's intermediate rows by them and
//      writes w[s] * result to fp32 partials [T*k, Hd].
// y[t] is then the partials summed over j in order (the oracle's order), rounded once: deterministic, and a
// token's result does not depend on which tokens share its experts. All accumulation is fp32.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu.h"

namespace ive::cpu {

namespace {

constexpr int64_t kTile = 4;       // a micro-tile: 4 slot rows x 4 weight rows, 16 independent dot products
// Below ~1 M multiply-adds (a tenth of a millisecond on one core) waking the OpenMP team costs more than it saves.
constexpr int64_t kParallelMacs = 1 << 20;
constexpr int64_t kRowBlock = 32;  // weight rows per work item (fp32 copy: 32 rows x Hd 2048 x 4 B = 256 KiB, L2)

// out[r][c] = sum_i a[r][i] * b[c][i], the weights b read in their storage type (fp32, or bf16 widened in
// registers: exact). The entry points are compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at load time
// (the extension is built without -march so that it runs on any x86-64); the body inlines into each.
template <typename W>
__attribute__((always_inline)) inline void dot_tile_body(const float* const* a, const W* const* b, int64_t n, float* out) {
  const float *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];
  const W *b0 = b[0], *b1 = b[1], *b2 = b[2], *b3 = b[3];
  float s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0;
  float s20 = 0, s21 = 0, s22 = 0, s23 = 0, s30 = 0, s31 = 0, s32 = 0, s33 = 0;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)
  for (int64_t i = 0; i < n; ++i) {
    const float x0 = a0[i], x1 = a1[i], x2 = a2[i], x3 = a3[i];
    const float w0 = to_float(b0[i]), w1 = to_float(b1[i]), w2 = to_float(b2[i]), w3 = to_float(b3[i]);
    s00 += x0 * w0; s01 += x0 * w1; s02 += x0 * w2; s03 += x0 * w3;
    s10 += x1 * w0; s11 += x1 * w1; s12 += x1 * w2; s13 += x1 * w3;
    s20 += x2 * w0; s21 += x2 * w1; s22 += x2 * w2; s23 += x2 * w3;
    s30 += x3 * w0; s31 += x3 * w1; s32 += x3 * w2; s33 += x3 * w3;
  }
  const float s[16] = {s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33};
  for (int i = 0; i < 16; ++i) out[i] = s[i];
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define IVE_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define IVE_SIMD_CLONES
#endif
IVE_SIMD_CLONES void dot_tile(const float* const* a, const float* const* b, int64_t n, float* out) {
  dot_tile_body(a, b, n, out);
}
IVE_SIMD_CLONES void dot_tile(const float* const* a, const bf16* const* b, int64_t n, float* out) {
  dot_tile_body(a, b, n, out);
}
IVE_SIMD_CLONES void widen(const bf16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

// Calls fn(w) with rows [r0, r0 + nr) of `src` (row length n) as dot_tile reads them: in place for fp32, and for
// bf16 when the expert has at most one tile of activation rows (decode: each weight is read once, so widening it in
// registers beats writing and re-reading a copy); otherwise widened to fp32 once into `buf` and reused by every row
// tile of the expert.
template <typename T, typename Fn>
void with_rows(const T* src, int64_t r0, int64_t nr, int64_t n, int64_t expert_rows, std::vector<float>& buf, Fn fn) {
  const T* p = src + r0 * n;
  if constexpr (std::is_same_v<T, float>) {
    fn(p);
  } else {
    if constexpr (std::is_same_v<T, bf16>) {
      if (expert_rows <= kTile) {
        fn(p);
        return;
      }
    }
    buf.resize(nr * n);
    if constexpr (std::is_same_v<T, bf16>) {
      widen(p, buf.data(), nr * n);
    } else {
      for (int64_t i = 0; i < nr * n; ++i) buf[i] = to_float(p[i]);
    }
    fn(static_cast<const float*>(buf.data()));
  }
}

// For each micro-tile of `rows` (pointers to the expert's fp32 activation rows) x `nw` weight rows at `w` (row
// length n): emit(row index, weight row index, dot). Short tiles repeat their last row (results dropped).
template <typename W, typename Emit>
void tiles(const std::vector<const float*>& rows, const W* w, int64_t nw, int64_t n, Emit emit) {
  const int64_t nr = int64_t(rows.size());
  float out[kTile * kTile];
  for (int64_t r = 0; r < nr; r += kTile)
    for (int64_t c = 0; c < nw; c += kTile) {
      const float* a[kTile];
      const W* b[kTile];
      for (int64_t i = 0; i < kTile; ++i) {
        a[i] = rows[std::min(r + i, nr - 1)];
        b[i] = w + std::min(c + i, nw - 1) * n;
      }
      dot_tile(a, b, n, out);
      for (int64_t i = 0; i < kTile && r + i < nr; ++i)
        for (int64_t j = 0; j < kTile && c + j < nw; ++j) emit(r + i, c + j, out[i * kTile + j]);
    }
}

struct Item {
  int64_t expert, row0, rows;
};

template <typename T>
void moe(T* y, const T* x, const T* w13, const T* w2, const float* tw, const std::vector<int64_t>& ids,
         int64_t tokens, int64_t hd, int64_t f, int64_t experts, int64_t topk) {
  const int64_t slots = tokens * topk;
  // counting sort of the slots by expert (stable: token order within an expert)
  std::vector<int64_t> start(experts + 1, 0), order(slots);
  for (int64_t s = 0; s < slots; ++s) ++start[ids[s] + 1];
  for (int64_t e = 0; e < experts; ++e) start[e + 1] += start[e];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t s = 0; s < slots; ++s) order[fill[ids[s]]++] = s;
  }
  auto items_of = [&](int64_t rows_per_expert) {
    std::vector<Item> items;
    for (int64_t e = 0; e < experts; ++e)
      if (start[e + 1] > start[e])
        for (int64_t r = 0; r < rows_per_expert; r += kRowBlock)
          items.push_back({e, r, std::min(kRowBlock, rows_per_expert - r)});
    return items;
  };
  std::vector<float> xf(tokens * hd), inter(slots * f), part(slots * hd);
  const bool parallel = 3 * slots * hd * f >= kParallelMacs;
#pragma omp parallel for schedule(static) if (tokens * hd >= kParallelMin)
  for (int64_t i = 0; i < tokens * hd; ++i) xf[i] = to_float(x[i]);

  const std::vector<Item> up_items = items_of(f), down_items = items_of(hd);
#pragma omp parallel if (parallel)
  {
    std::vector<float> gbuf;
    std::vector<const float*> rows;
    std::vector<float> gate;
#pragma omp for schedule(dynamic, 1)
    for (size_t it = 0; it < up_items.size(); ++it) {
      const Item& item = up_items[it];
      const T* we = w13 + item.expert * 2 * f * hd;
      const int64_t n = start[item.expert + 1] - start[item.expert];
      const int64_t* slot = order.data() + start[item.expert];
      rows.resize(n);
      for (int64_t r = 0; r < n; ++r) rows[r] = xf.data() + (slot[r] / topk) * hd;
      gate.assign(n * item.rows, 0.f);
      with_rows(we, item.row0, item.rows, hd, n, gbuf, [&](auto g) {
        tiles(rows, g, item.rows, hd, [&](int64_t r, int64_t c, float v) { gate[r * item.rows + c] = v; });
      });
      with_rows(we, f + item.row0, item.rows, hd, n, gbuf, [&](auto u) {
        tiles(rows, u, item.rows, hd, [&](int64_t r, int64_t c, float v) {
          const float a = gate[r * item.rows + c];
          inter[slot[r] * f + item.row0 + c] = a / (1.f + std::exp(-a)) * v;
        });
      });
    }
#pragma omp for schedule(dynamic, 1)
    for (size_t it = 0; it < down_items.size(); ++it) {
      const Item& item = down_items[it];
      const int64_t n = start[item.expert + 1] - start[item.expert];
      const int64_t* slot = order.data() + start[item.expert];
      rows.resize(n);
      for (int64_t r = 0; r < n; ++r) rows[r] = inter.data() + slot[r] * f;
      with_rows(w2 + item.expert * hd * f, item.row0, item.rows, f, n, gbuf, [&](auto d) {
        tiles(rows, d, item.rows, f, [&](int64_t r, int64_t c, float v) {
          part[slot[r] * hd + item.row0 + c] = tw[slot[r]] * v;
        });
      });
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t c = 0; c < hd; ++c) {
        float acc = 0.f;
        for (int64_t j = 0; j < topk; ++j) acc += part[(t * topk + j) * hd + c];
        y[t * hd + c] = from_float<T>(acc);
      }
  }
}

}  // namespace

void fused_moe(ptr y, ptr x, ptr w13, ptr w2, ptr topk_weights, ptr topk_ids, int64_t tokens, int64_t hidden,
               int64_t inter, int64_t experts, int64_t topk, bool ids_int64, int dtype) {
  const char* op = "fused_moe";
  check_dtype(dtype, op);
  IVE_CHECK(tokens >= 0 && hidden > 0 && inter > 0 && experts > 0 && topk > 0 && topk <= experts, op,
            "sizes must be positive and topk <= experts");
  check_ptrs(op, {{"y", y}, {"x", x}, {"w13", w13}, {"w2", w2}, {"topk_weights", topk_weights},
                  {"topk_ids", topk_ids}});
  std::vector<int64_t> ids(tokens * topk);
  for (int64_t s = 0; s < tokens * topk; ++s) {  // host memory: the range check is free
    ids[s] = ids_int64 ? as<const int64_t>(topk_ids)[s] : int64_t(as<const int32_t>(topk_ids)[s]);
    IVE_CHECK(ids[s] >= 0 && ids[s] < experts, op, "topk_ids must lie in [0, experts)");
  }
  IVE_CPU_DISPATCH(dtype, moe(as<scalar_t>(y), as<const scalar_t>(x), as<const scalar_t>(w13),
                              as<const scalar_t>(w2), as<const float>(topk_weights), ids, tokens, hidden, inter,
                              experts, topk));
}

}  // namespace ive::cpu
