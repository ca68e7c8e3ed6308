// The CUDA emulator's runtime: block/warp barriers, warp shuffles and the grid runner (see emu.h for the model).
#include "emu.h"

#include <atomic>
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

namespace emu {

uint3 g_block_idx;
dim3 g_block_dim, g_grid_dim;
__thread uint3 t_thread_idx;

void fatal(const char* what) {
  std::fprintf(stderr, "CUDA emulator: %s (block (%u, %u, %u), thread %u)\n", what, g_block_idx.x, g_block_idx.y,
               g_block_idx.z, t_thread_idx.x);
  std::fflush(stderr);
  std::abort();
}

namespace {

constexpr unsigned kFullMask = 0xffffffffu;

struct Warp {
  std::optional<std::barrier<>> bar;  // the warp's live lanes
  std::atomic<int> live{0};           // lanes that have not returned from the kernel yet
  int size = 0;                       // lanes the warp was launched with (32 except maybe the last warp)
  uint32_t slot[2][32] = {};          // shuffle exchange, double-buffered (see shfl_word)
};

// The state of the block being run. Re-armed (fresh barriers, all threads live) before every block.
struct Block {
  std::optional<std::barrier<>> bar;
  Warp warps[32];
  uint8_t parity[1024] = {};  // per thread: which half of its warp's slot buffer its next shuffle uses
  int threads = 0, nwarps = 0;

  void arm() {
    bar.emplace(threads);
    std::memset(parity, 0, sizeof parity);
    for (int w = 0; w < nwarps; ++w) {
      warps[w].bar.emplace(warps[w].size);
      warps[w].live.store(warps[w].size, std::memory_order_relaxed);
    }
  }
  void configure(int n) {
    threads = n;
    nwarps = (n + 31) / 32;
    for (int w = 0; w < nwarps; ++w) warps[w].size = std::min(32, n - 32 * w);
    arm();
  }
  // The calling thread returned from the kernel: it no longer takes part in this block's barriers.
  void exit_thread(unsigned t) {
    Warp& w = warps[t >> 5];
    w.live.fetch_sub(1, std::memory_order_acq_rel);
    w.bar->arrive_and_drop();
    bar->arrive_and_drop();
  }
};

Block g_blk;
std::mutex g_launch_mutex;

Warp& my_full_warp(unsigned mask, const char* op) {
  if (mask != kFullMask) {
    static char msg[160];
    std::snprintf(msg, sizeof msg, "%s with mask 0x%08x: the emulator implements full-warp (0xffffffff) masks only",
                  op, mask);
    fatal(msg);
  }
  Warp& w = g_blk.warps[t_thread_idx.x >> 5];
  if (w.size != 32) fatal("full-mask warp operation in a warp of fewer than 32 threads (blockDim.x % 32 != 0)");
  if (w.live.load(std::memory_order_acquire) != 32)
    fatal("full-mask warp operation after a lane of the warp returned from the kernel");
  return w;
}

}  // namespace

void syncthreads() { g_blk.bar->arrive_and_wait(); }

void syncwarp(unsigned mask) { my_full_warp(mask, "__syncwarp").bar->arrive_and_wait(); }

// One barrier per shuffle: consecutive shuffles of a warp alternate between the two halves of its slot buffer.
// A lane can only write half p again (two shuffles later) after passing the barrier of the shuffle in between,
// which every other lane reaches only after it has read half p.
uint32_t shfl_word(unsigned mask, uint32_t word, int src) {
  Warp& w = my_full_warp(mask, "warp shuffle");
  const unsigned t = t_thread_idx.x;
  uint32_t* slot = w.slot[g_blk.parity[t]];
  g_blk.parity[t] ^= 1;
  slot[t & 31] = word;
  w.bar->arrive_and_wait();  // every lane has published
  return (src >= 0 && src < 32) ? slot[src] : word;
}

void run_grid(dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body) {
  if (block.y != 1 || block.z != 1) fatal("only 1-D thread blocks are emulated");
  if (block.x == 0 || block.x > 1024) fatal("blockDim.x must be in [1, 1024]");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fatal("a grid dimension is 0 (invalid configuration)");
  if (grid.x > 0x7fffffffu || grid.y > 65535u || grid.z > 65535u) fatal("grid dimensions past the hardware limits");
  if (dynamic_smem != 0) fatal("dynamic shared memory is not emulated");

  std::lock_guard<std::mutex> lock(g_launch_mutex);  // static __shared__ storage is process-wide: one launch at a time
  g_grid_dim = grid;
  g_block_dim = block;
  g_block_idx = make_uint3(0, 0, 0);
  const unsigned nt = block.x;
  const uint64_t total = uint64_t(grid.x) * grid.y * grid.z;
  g_blk.configure(static_cast<int>(nt));

  // Between blocks every thread meets here; the completion step (run once, while all threads wait) moves to the
  // next block and re-arms the block's barriers.
  uint64_t next = 0;
  auto advance = [&]() noexcept {
    if (++next >= total) return;
    g_block_idx = make_uint3(static_cast<unsigned>(next % grid.x), static_cast<unsigned>(next / grid.x % grid.y),
                             static_cast<unsigned>(next / grid.x / grid.y));
    g_blk.arm();
  };
  std::barrier<decltype(advance)> between(nt, advance);

  auto worker = [&](unsigned t) {
    t_thread_idx = make_uint3(t, 0, 0);
    for (uint64_t i = 0; i < total; ++i) {
      body();
      g_blk.exit_thread(t);
      between.arrive_and_wait();
    }
  };

  const uint3 caller_idx = t_thread_idx;
  std::vector<std::thread> threads;
  threads.reserve(nt - 1);
  for (unsigned t = 1; t < nt; ++t) threads.emplace_back(worker, t);
  worker(0);  // the calling thread is CUDA thread 0
  for (auto& th : threads) th.join();
  t_thread_idx = caller_idx;
}

}  // namespace emu
