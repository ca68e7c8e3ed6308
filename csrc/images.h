// Host image preprocessing launchers (csrc/cpu/images.cpp), beside the kernel contract in ops.h: uint8 pixels in
// interleaved HWC layout, addresses and sizes as integers like every launcher here. Both release the GIL
// (bindings.cpp), so requests preprocessed on a thread pool run in parallel.
#pragma once
#include <cstdint>

#include "ops.h"

namespace ive::images {

// Pillow-exact two-pass resize of [in_h, in_w, channels] to [out_h, out_w, channels]. Bounds are int32 [out, 2]
// (first input index, tap count), coefficients int32 [out, ksize] in Pillow's 22-bit fixed point; a 0 pair skips
// that pass (the size must then be unchanged). vertical_first picks the order of the two passes.
void resize_u8(ptr out, ptr in, int64_t in_h, int64_t in_w, int64_t out_h, int64_t out_w, int64_t channels,
               ptr h_bounds, ptr h_coeffs, int64_t h_ksize, ptr v_bounds, ptr v_coeffs, int64_t v_ksize,
               bool vertical_first, int64_t threads);

// [rows * tile, cols * tile, channels] uint8 -> [rows * cols, channels, tile, tile] float32, tiles row-major,
// each value looked up in its channel's row of table [channels, 256].
void tiles_normalize(ptr out, ptr in, int64_t rows, int64_t cols, int64_t tile, int64_t channels, ptr table,
                     int64_t threads);

}  // namespace ive::images
