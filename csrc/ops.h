// The launchers of every op in the kernel contract (ARCHITECTURE.md, "The kernel contract"), CPU and CUDA.
//
// Framework-free on purpose: tensors cross the seam as integer addresses (`ptr`) plus sizes and row strides, and
// CUDA launchers take the stream as an integer, so this compiles with a C++ compiler, nvcc and pybind11 alone and
// never depends on the torch ABI. The Python wrappers in internvl_engine/ops validate every tensor (device, dtype,
// shape, contiguity) before an address is taken; the launchers re-check what a wrong value would turn into an
// out-of-bounds access (sizes, head dims, dtypes) and throw std::invalid_argument (ValueError in Python).
//
// Layouts (elements, not bytes):
//   activations  [rows, cols] dense;  q/k/v [T, heads, D] with token stride `*_stride` and dense heads and D
//   caches       [num_blocks, block_size, Hk, D] dense; slot = block * block_size + offset; slot < 0 skips
//   cos_sin      [P, D] fp32, cos in the first D/2 columns, sin in the last D/2
//   positions, slot_mapping int64;  cu_seqlens, block_tables, seq_lens int32
#pragma once
#include <cstdint>

namespace ive {

using ptr = std::uintptr_t;     // a device or host address
using stream_t = std::uintptr_t;  // a cudaStream_t

// Split-KV decode splits the block-table capacity into ranges of this many tokens, whatever the batch, so a
// sequence's output does not depend on what it is batched with (the one home of this number: the bindings export
// it as _C.PAGED_SPLIT_TOKENS, which ops.paged_split_tokens() reads for the Python wrappers and the Triton kernel).
constexpr int64_t kPagedSplitTokens = 256;

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

#define IVE_OP_SIGNATURES(STREAM)                                                                                   \
  /* y = w * normalize(x [+ residual]); with residual also writes residual_out = x + residual (both may be 0) */   \
  void rms_norm(ptr out, ptr residual_out, ptr x, ptr residual, ptr weight, int64_t rows, int64_t cols,            \
                double eps, int dtype STREAM);                                                                      \
  /* bias may be 0 */                                                                                               \
  void layer_norm(ptr out, ptr x, ptr weight, ptr bias, int64_t rows, int64_t cols, double eps, int dtype STREAM); \
  /* [n, side*side, c] -> [n, (side/factor)^2, c*factor^2] */                                                       \
  void pixel_shuffle(ptr out, ptr in, int64_t n, int64_t side, int64_t channels, int64_t factor, int dtype STREAM); \
  /* NeoX rotate-half, in place on q [T, H, D] and k [T, Hk, D] */                                                 \
  void rotary(ptr q, ptr k, ptr positions, ptr cos_sin, int64_t tokens, int64_t heads, int64_t kv_heads,           \
              int64_t head_dim, int64_t q_stride, int64_t k_stride, int dtype STREAM);                             \
  void write_kv_cache(ptr k_cache, ptr v_cache, ptr k, ptr v, ptr slot_mapping, int64_t tokens, int64_t kv_heads,  \
                      int64_t head_dim, int64_t k_stride, int64_t v_stride, int64_t block_size, int dtype STREAM); \
  /* varlen; out [Tq, H, D] dense; causal masks are aligned bottom-right (query i of a sequence with Lq queries  \
     and Lk keys sees keys 0 .. Lk - Lq + i) */                                                                     \
  void flash_attention(ptr out, ptr q, ptr k, ptr v, ptr cu_seqlens_q, ptr cu_seqlens_k, int64_t batch,            \
                       int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t heads, int64_t kv_heads,                \
                       int64_t head_dim, int64_t q_stride, int64_t k_stride, int64_t v_stride, bool causal,        \
                       double scale, int dtype STREAM);

namespace cpu {
#define IVE_NO_STREAM
IVE_OP_SIGNATURES(IVE_NO_STREAM)
// decode: q [B, H, D] (token stride q_stride), out [B, H, D] dense
void paged_attention(ptr out, ptr q, ptr k_cache, ptr v_cache, ptr block_tables, ptr seq_lens, int64_t batch,
                     int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t q_stride, int64_t block_size,
                     int64_t max_blocks, double scale, int dtype);
// Routed SwiGLU experts: x [T, Hd], w13 [E, 2F, Hd] (gate rows, then up rows), w2 [E, Hd, F], topk_weights [T, k]
// fp32, topk_ids [T, k] int64 (ids_int64) or int32, all dense; y [T, Hd]. Throws on an id outside [0, E).
void fused_moe(ptr y, ptr x, ptr w13, ptr w2, ptr topk_weights, ptr topk_ids, int64_t tokens, int64_t hidden,
               int64_t inter, int64_t experts, int64_t topk, bool ids_int64, int dtype);
}  // namespace cpu

namespace cuda {
#define IVE_WITH_STREAM , stream_t stream
IVE_OP_SIGNATURES(IVE_WITH_STREAM)
// Split-KV decode: with num_splits > 1 each (sequence, KV head, split) program writes a partial result to
// `workspace` (fp32, batch * heads * num_splits * (head_dim + 2) floats: out, running max, running sum) and a
// second kernel merges them; with num_splits == 1 workspace may be 0.
void paged_attention(ptr out, ptr q, ptr k_cache, ptr v_cache, ptr block_tables, ptr seq_lens, int64_t batch,
                     int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t q_stride, int64_t block_size,
                     int64_t max_blocks, double scale, int dtype, ptr workspace, int64_t num_splits,
                     stream_t stream);
}  // namespace cuda

}  // namespace ive
