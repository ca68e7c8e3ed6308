"""Shared launch helpers for the Triton kernels.

`autotune` wraps `triton.autotune` so the same kernels run under the Triton interpreter (TRITON_INTERPRET=1, CPU
tensors): autotuning benchmarks each config with CUDA events, which the interpreter cannot do, so there the first
config is used as a fixed choice. configs[0] of every kernel is therefore chosen to be valid for every head dim and
cheap to interpret (few, large programs).

`INTERNVL_ENGINE_TRITON_CONFIG=i` (or `use_config(i)`) launches configs[i] instead of tuning, on a GPU too. The GPU
correctness tests run that way: tuning benchmarks every config for every new key, and at a few seconds of compiling
per config that cut the GPU kernel tests short. tests/test_triton_configs.py runs each config on purpose instead.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

# Read once at import: @triton.jit itself decides interpret-vs-compile at decoration time from the same variable.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634  # the attention kernels' softmax runs in base 2: exp(x) = exp2(x log2 e)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (tl.arange extents must be powers of two; the tail is masked)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def token_col_tiles(tokens: int, n_cols: int, max_block_c: int):
    """(BLOCK_T, BLOCK_C, grid) for a kernel whose programs own BLOCK_T tokens x BLOCK_C columns of a [tokens, n_cols]
    problem: BLOCK_C covers the columns up to max_block_c (4096 under the interpreter: few, large programs), BLOCK_T
    fills a tile of 2048 elements (65536 under the interpreter); grid is (token tiles, column tiles)."""
    block_c = min(next_pow2(n_cols), 4096 if INTERPRET else max_block_c)
    block_t = min(next_pow2(tokens), max(1, (65536 if INTERPRET else 2048) // block_c))
    return block_t, block_c, (triton.cdiv(tokens, block_t), triton.cdiv(n_cols, block_c))


_forced: int | None = None
_env_config = os.environ.get("INTERNVL_ENGINE_TRITON_CONFIG", "")
if _env_config:
    if not _env_config.isdigit():
        raise ValueError(f"INTERNVL_ENGINE_TRITON_CONFIG must be a config index (0, 1, ...), got {_env_config!r}")
    _forced = int(_env_config)


class use_config:
    """Context manager: autotuned kernels launch configs[index] (None: tune again) inside the block."""

    def __init__(self, index: int | None):
        self.index = index

    def __enter__(self):
        global _forced
        self._saved, _forced = _forced, self.index
        return self

    def __exit__(self, *exc):
        global _forced
        _forced = self._saved


class _Tuned:
    """`k[grid](*args)`: launches the forced config, configs[0] under the interpreter, else triton's autotuner."""

    def __init__(self, fn, configs, key):
        self.fn = fn
        self.configs = configs
        self.tuner = None if INTERPRET else triton.autotune(configs=configs, key=key)(fn)

    def __getitem__(self, grid):
        if _forced is None and self.tuner is not None:
            return self.tuner[grid]
        index = _forced or 0
        if index >= len(self.configs):
            raise ValueError(f"{self.fn.__name__}: forced Triton config {index} of {len(self.configs)} "
                             f"(INTERNVL_ENGINE_TRITON_CONFIG / use_config)")
        config = self.configs[index]

        def launch(*args, **kwargs):
            meta = {**kwargs, **config.kwargs}
            g = grid(meta) if callable(grid) else grid
            if not INTERPRET:  # the interpreter has no warps or pipeline stages
                meta.update(num_warps=config.num_warps, num_stages=config.num_stages)
            return self.fn[g](*args, **meta)
        return launch


def autotune(configs, key):
    """Decorator: triton.autotune(configs, key) on a GPU, configs[0] under the interpreter, configs[i] when forced."""
    return lambda fn: _Tuned(fn, configs, key)


# ---- dtype helpers shared by the kernels ---------------------------------------------------------------------------
# The Triton interpreter stores bf16 as raw uint16 and (as of triton 3.8) gets two things wrong that real GPUs do
# right: tl.dot on bf16 operands multiplies the raw bit patterns, and fp32 -> bf16 casts truncate (and the explicit
# "rtne" mode drops the mantissa carry). Kernels therefore round and feed dots through these helpers; on a GPU they
# are trivial @triton.jit functions (a plain .to() and the native bf16 dot). Under the interpreter they are plain
# Python called from the interpreted kernel: an interpreted @triton.jit device call re-patches triton.language on
# every call, which made them the dominant interpreter cost.
if INTERPRET:
    def to_dtype(x, dtype):
        """Round fp32 `x` to `dtype`, nearest-even (bf16 by bit arithmetic: add 0x7FFF plus the lowest kept bit,
        keep the high half; inputs are never NaN)."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return x.to(dtype)

    def dot_operand(x):
        """bf16 tl.dot operands are widened exactly to fp32 (products of bf16 values are exact in fp32)."""
        if x.dtype == tl.bfloat16:
            # Exact widening as integer ops (the interpreter's own bf16 -> fp32 cast is slow Python bit twiddling).
            return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        return x

    # tl.max / tl.sum are themselves @jit functions (same per-call re-patching cost, ~30% of an interpreted attention
    # kernel); the interpreter's tl.reduce maps these combine functions straight to numpy.
    _MAX_COMBINE = getattr(tl.standard, "_elementwise_max", None)
    _SUM_COMBINE = getattr(tl.standard, "_sum_combine", None)

    def row_max(x, axis):
        return tl.reduce(x, axis, _MAX_COMBINE) if _MAX_COMBINE is not None else tl.max(x, axis)

    def row_sum(x, axis):
        return tl.reduce(x, axis, _SUM_COMBINE) if _SUM_COMBINE is not None else tl.sum(x, axis)
else:
    row_max = tl.max
    row_sum = tl.sum

    @triton.jit
    def to_dtype(x, dtype: tl.constexpr):
        return x.to(dtype)

    @triton.jit
    def dot_operand(x):
        return x
